// Input checks at the op boundary, shared by the CPU and CUDA implementations.
//
// Every message names the op, the argument, what was expected and what was found. The *_cpu checks
// read tensor values and must only be called on CPU tensors (the CUDA path never reads device values).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "torchrec_tt/enums.h"
#include "torchrec_tt/plan_layout.h"
#include "torchrec_tt/tt_layout.h"

namespace torchrec_tt {

inline bool is_core_dtype(at::ScalarType t, bool allow_reduced_precision) {
  return t == at::kFloat || t == at::kDouble ||
      (allow_reduced_precision && (t == at::kHalf || t == at::kBFloat16));
}

// Checks the cores of one table and returns its layout: 2 <= d <= 4, each core 4-D
// (m_k, R[k], n_k, R[k+1]) with positive sizes, R[0] = R[d] = 1, a consistent rank chain, one
// floating dtype (float32/float64; half/bfloat16 only where allow_reduced_precision) and one device.
inline TTLayout check_cores(
    const char* op,
    at::TensorList cores,
    bool allow_reduced_precision) {
  const int64_t d = static_cast<int64_t>(cores.size());
  TORCH_CHECK_VALUE(
      d >= kMinCores && d <= kMaxCores,
      op, ": cores must hold ", kMinCores, " to ", kMaxCores, " cores, got ", d);
  const at::Tensor& c0 = cores[0];
  TORCH_CHECK_VALUE(
      is_core_dtype(c0.scalar_type(), allow_reduced_precision),
      op, ": cores must be ",
      allow_reduced_precision ? "float32, float64, float16 or bfloat16" : "float32 or float64",
      " on ", c0.device(), ", got cores[0] of dtype ", c0.scalar_type());
  TTLayout layout;
  layout.d = d;
  for (const auto k : c10::irange(d)) {
    const at::Tensor& c = cores[k];
    TORCH_CHECK_VALUE(
        c.dim() == 4,
        op, ": cores[", k, "] must be 4-D (m_k, R[k], n_k, R[k+1]), got ", c.dim(),
        "-D tensor of shape ", c.sizes());
    TORCH_CHECK_VALUE(
        c.scalar_type() == c0.scalar_type(),
        op, ": cores[", k, "] must have the dtype of cores[0] (", c0.scalar_type(), "), got ",
        c.scalar_type());
    TORCH_CHECK_VALUE(
        c.device() == c0.device(),
        op, ": cores[", k, "] must be on the device of cores[0] (", c0.device(), "), got ",
        c.device());
    for (const auto t : c10::irange(4)) {
      TORCH_CHECK_VALUE(
          c.size(t) >= 1,
          op, ": cores[", k, "] must have positive sizes, got shape ", c.sizes());
    }
    layout.m[k] = c.size(0);
    layout.n[k] = c.size(2);
    layout.R[k] = c.size(1);
    if (k > 0) {
      TORCH_CHECK_VALUE(
          cores[k - 1].size(3) == c.size(1),
          op, ": rank mismatch: cores[", k, "].size(1) must equal cores[", k - 1, "].size(3) = ",
          cores[k - 1].size(3), ", got ", c.size(1));
    }
  }
  layout.R[d] = cores[d - 1].size(3);
  TORCH_CHECK_VALUE(
      layout.R[0] == 1,
      op, ": cores[0].size(1) (R[0]) must be 1, got ", layout.R[0]);
  TORCH_CHECK_VALUE(
      layout.R[d] == 1,
      op, ": cores[", d - 1, "].size(3) (R[d]) must be 1, got ", layout.R[d]);
  int64_t rows = 1;
  for (const auto k : c10::irange(d)) {
    TORCH_CHECK_VALUE(
        rows <= std::numeric_limits<int64_t>::max() / layout.m[k],
        op, ": the number of rows prod(cores[k].size(0)) must fit in int64, got an overflow at cores[",
        k, "]");
    rows *= layout.m[k];
  }
  return layout;
}

// indices and offsets: 1-D, one integer dtype (int32 or int64), offsets non-empty (B + 1 entries),
// both on `device`.
inline void check_indices_offsets(
    const char* op,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const c10::Device& device) {
  TORCH_CHECK_VALUE(
      indices.dim() == 1, op, ": indices must be 1-D, got ", indices.dim(),
      "-D tensor of shape ", indices.sizes());
  TORCH_CHECK_VALUE(
      offsets.dim() == 1, op, ": offsets must be 1-D, got ", offsets.dim(),
      "-D tensor of shape ", offsets.sizes());
  TORCH_CHECK_VALUE(
      indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
      op, ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(
      offsets.scalar_type() == indices.scalar_type(),
      op, ": offsets must have the dtype of indices (", indices.scalar_type(), "), got ",
      offsets.scalar_type());
  TORCH_CHECK_VALUE(
      offsets.numel() >= 1,
      op, ": offsets must have B + 1 >= 1 entries, got 0");
  TORCH_CHECK_VALUE(
      indices.device() == device, op, ": indices must be on ", device, ", got ", indices.device());
  TORCH_CHECK_VALUE(
      offsets.device() == device, op, ": offsets must be on ", device, ", got ", offsets.device());
}

// per_sample_weights (optional): 1-D with indices.numel() entries, dtype and device of `like`.
inline void check_per_sample_weights(
    const char* op,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t nnz,
    const at::Tensor& like) {
  if (!per_sample_weights.has_value()) {
    return;
  }
  const at::Tensor& w = *per_sample_weights;
  TORCH_CHECK_VALUE(
      w.dim() == 1 && w.numel() == nnz,
      op, ": per_sample_weights must be 1-D with indices.numel() = ", nnz,
      " entries, got shape ", w.sizes());
  TORCH_CHECK_VALUE(
      w.scalar_type() == like.scalar_type(),
      op, ": per_sample_weights must have the cores' dtype (", like.scalar_type(), "), got ",
      w.scalar_type());
  TORCH_CHECK_VALUE(
      w.device() == like.device(),
      op, ": per_sample_weights must be on ", like.device(), ", got ", w.device());
}

// Checked conversions of the ops' int arguments to the enums.
inline PoolingMode to_pooling_mode(const char* op, int64_t pooling_mode) {
  TORCH_CHECK_VALUE(
      pooling_mode == static_cast<int64_t>(PoolingMode::kSum) ||
          pooling_mode == static_cast<int64_t>(PoolingMode::kMean),
      op, ": pooling_mode must be 0 (PoolingMode.SUM) or 1 (PoolingMode.MEAN), got ", pooling_mode);
  return static_cast<PoolingMode>(pooling_mode);
}

inline Variant to_variant(const char* op, int64_t variant) {
  TORCH_CHECK_VALUE(
      variant == static_cast<int64_t>(Variant::kTT) || variant == static_cast<int64_t>(Variant::kGRT),
      op, ": variant must be 0 (Variant.TT) or 1 (Variant.GRT), got ", variant);
  return static_cast<Variant>(variant);
}

inline void check_modes(const char* op, int64_t pooling_mode, int64_t variant) {
  to_pooling_mode(op, pooling_mode);
  to_variant(op, variant);
}

inline void check_grad_output(
    const char* op,
    const at::Tensor& grad_output,
    int64_t batch_size,
    int64_t embedding_dim,
    const at::Tensor& like) {
  TORCH_CHECK_VALUE(
      grad_output.dim() == 2 && grad_output.size(0) == batch_size &&
          grad_output.size(1) == embedding_dim,
      op, ": grad_output must have shape (B, N) = (", batch_size, ", ", embedding_dim, "), got ",
      grad_output.sizes());
  TORCH_CHECK_VALUE(
      grad_output.scalar_type() == like.scalar_type(),
      op, ": grad_output must have the cores' dtype (", like.scalar_type(), "), got ",
      grad_output.scalar_type());
  TORCH_CHECK_VALUE(
      grad_output.device() == like.device(),
      op, ": grad_output must be on ", like.device(), ", got ", grad_output.device());
}

// Inputs of tt_embedding_bag(_backward), checked by check_tt_inputs and made contiguous by
// make_tt_inputs_contiguous.
struct TTInputs {
  TTLayout layout;
  std::vector<at::Tensor> cores; // contiguous
  at::Tensor indices;
  at::Tensor offsets;
  std::optional<at::Tensor> psw;
  int64_t batch_size = 0;
  int64_t nnz = 0;
};

// The boundary checks of tt_embedding_bag(_backward) common to every device (no value reads): the
// cores (on a `device_type` device), indices/offsets, per_sample_weights and the modes. Returns the
// layout and sizes; the tensors are filled in by make_tt_inputs_contiguous.
inline TTInputs check_tt_inputs(
    const char* op,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    c10::DeviceType device_type,
    bool allow_reduced_precision) {
  TTInputs in;
  in.layout = check_cores(op, cores, allow_reduced_precision);
  TORCH_CHECK_VALUE(
      cores[0].device().type() == device_type, op, ": cores must be on a ",
      c10::DeviceTypeName(device_type), " device, got cores[0] on ", cores[0].device());
  check_indices_offsets(op, indices, offsets, cores[0].device());
  check_per_sample_weights(op, per_sample_weights, indices.numel(), cores[0]);
  check_modes(op, pooling_mode, variant);
  in.batch_size = offsets.numel() - 1;
  in.nnz = indices.numel();
  return in;
}

inline void make_tt_inputs_contiguous(
    TTInputs& in,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights) {
  in.cores.reserve(cores.size());
  for (const auto& c : cores) {
    in.cores.push_back(c.contiguous());
  }
  in.indices = indices.contiguous();
  in.offsets = offsets.contiguous();
  if (per_sample_weights.has_value()) {
    in.psw = per_sample_weights->contiguous();
  }
}

// group_plan's arguments on a `device_type` device (no value reads).
inline void check_group_plan_inputs(
    const char* op,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    int64_t last_rows,
    c10::DeviceType device_type) {
  check_indices_offsets(op, indices, offsets, indices.device());
  TORCH_CHECK_VALUE(
      indices.device().type() == device_type, op, ": expected ", c10::DeviceTypeName(device_type),
      " tensors, got indices on ", indices.device());
  TORCH_CHECK_VALUE(last_rows >= 1, op, ": last_rows must be >= 1, got ", last_rows);
}

// A plan passed to tt_embedding_bag(_backward): the 1-D int64 tensor of group_plan for a batch of
// nnz lookups and B bags (plan_layout.h), on the batch's device. Returns it contiguous.
inline at::Tensor check_plan_shape(
    const char* op,
    const at::Tensor& plan,
    int64_t nnz,
    int64_t batch_size,
    const c10::Device& device) {
  const int64_t numel = PlanLayout::make(nnz, batch_size).numel;
  TORCH_CHECK_VALUE(
      plan.dim() == 1 && plan.scalar_type() == at::kLong && plan.numel() == numel,
      op, ": plan must be the 1-D int64 tensor of group_plan(indices, offsets, last_rows) for this "
      "batch (", numel, " entries for nnz = ", nnz, ", B = ", batch_size, "), got ",
      plan.scalar_type(), " of shape ", plan.sizes());
  TORCH_CHECK_VALUE(plan.device() == device, op, ": plan must be on ", device, ", got ", plan.device());
  return plan.contiguous();
}

// The backward's own arguments: grad_output (B, N) like the cores, and per_sample_weights given
// when its gradient is requested.
inline void check_backward_inputs(
    const char* op,
    const at::Tensor& grad_output,
    const TTInputs& in,
    bool per_sample_weights_requires_grad) {
  check_grad_output(op, grad_output, in.batch_size, in.layout.embedding_dim(), in.cores[0]);
  TORCH_CHECK_VALUE(
      !per_sample_weights_requires_grad || in.psw.has_value(),
      op, ": per_sample_weights must be given when per_sample_weights_requires_grad is true, got None");
}

// The messages of the value checks, shared by the CPU checks below and the CUDA opt-in bounds
// check (which finds the first bad position on the device and reports it on the host).
inline void fail_offsets_first(const char* op, int64_t first) {
  TORCH_CHECK_VALUE(false, op, ": offsets[0] must be 0, got ", first);
}

inline void fail_offsets_last(const char* op, int64_t B, int64_t nnz, int64_t last) {
  TORCH_CHECK_VALUE(
      false, op, ": offsets[-1] (offsets[", B, "]) must equal indices.numel() = ", nnz, ", got ",
      last);
}

inline void fail_offsets_decreasing(const char* op, int64_t b, int64_t at_b, int64_t at_next) {
  TORCH_CHECK_VALUE(
      false, op, ": offsets must be non-decreasing, got offsets[", b, "] = ", at_b, " > offsets[",
      b + 1, "] = ", at_next);
}

// num_rows < 0: unbounded (only negative indices are errors).
inline void fail_index_out_of_range(const char* op, int64_t j, int64_t v, int64_t num_rows) {
  if (num_rows < 0) {
    TORCH_CHECK_VALUE(false, op, ": indices[", j, "] must be >= 0, got ", v);
  }
  TORCH_CHECK_VALUE(false, op, ": indices[", j, "] must be in [0, ", num_rows, "), got ", v);
}

// CPU only (reads values). offsets must be contiguous: offsets[0] == 0, offsets[B] == nnz and
// non-decreasing.
template <typename index_t>
inline void check_offsets_values_cpu(const char* op, const index_t* offsets, int64_t B, int64_t nnz) {
  if (C10_UNLIKELY(static_cast<int64_t>(offsets[0]) != 0)) {
    fail_offsets_first(op, static_cast<int64_t>(offsets[0]));
  }
  if (C10_UNLIKELY(static_cast<int64_t>(offsets[B]) != nnz)) {
    fail_offsets_last(op, B, nnz, static_cast<int64_t>(offsets[B]));
  }
  for (int64_t b = 0; b < B; ++b) {
    if (C10_UNLIKELY(offsets[b + 1] < offsets[b])) {
      fail_offsets_decreasing(
          op, b, static_cast<int64_t>(offsets[b]), static_cast<int64_t>(offsets[b + 1]));
    }
  }
}

// CPU only (reads values). Every index must lie in [0, num_rows); num_rows < 0 means unbounded
// (only non-negativity is checked). Compares in 64 bits whatever index_t is, so int32 indices of
// a table of more than 2^31 rows are accepted, and a bad index is reported with its own value.
template <typename index_t>
inline void check_indices_range_cpu(
    const char* op,
    const index_t* indices,
    int64_t nnz,
    int64_t num_rows) {
  const uint64_t hi = num_rows < 0 ? static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + 1
                                   : static_cast<uint64_t>(num_rows);
  // The largest index as unsigned (negative ones wrap above every bound): a max reduction the
  // compiler vectorizes, where a running `ok &= index < hi` stayed scalar.
  uint64_t largest = 0;
  for (int64_t j = 0; j < nnz; ++j) {
    largest = std::max(largest, static_cast<uint64_t>(static_cast<int64_t>(indices[j])));
  }
  if (C10_LIKELY(nnz == 0 || largest < hi)) {
    return;
  }
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t v = static_cast<int64_t>(indices[j]);
    if (static_cast<uint64_t>(v) >= hi) {
      fail_index_out_of_range(op, j, v, num_rows);
    }
  }
}

} // namespace torchrec_tt
