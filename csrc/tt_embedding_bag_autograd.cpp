// Autograd of torchrec_tt::tt_embedding_bag for every device: a C++ autograd function registered
// at the Autograd key. Its forward runs the device kernel below autograd, saves the inputs (the
// batch's grt plan among them: the backward never regroups) and its backward calls
// tt_embedding_bag_backward. Registered in C++ rather than with torch.library.register_autograd:
// the Python wrapper cost ~0.2 ms per forward+backward (450 against 255 us for a one-bag batch on
// CPU), more than the kernels themselves on small batches. docs/design.md section 3.1.

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace torchrec_tt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The ops' unboxed signatures (csrc/ops.cpp's schemas).
using ForwardSignature = at::Tensor(
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    const std::optional<at::Tensor>& plan,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids);
using BackwardSignature = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const at::Tensor& grad_output,
    at::TensorList cores,
    const at::Tensor& indices,
    const at::Tensor& offsets,
    const std::optional<at::Tensor>& per_sample_weights,
    int64_t pooling_mode,
    int64_t variant,
    bool per_sample_weights_requires_grad,
    const std::optional<at::Tensor>& plan,
    const std::optional<at::Tensor>& cache_weight,
    const std::optional<at::Tensor>& cache_ids);

const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto handle =
      c10::Dispatcher::singleton().findSchemaOrThrow("torchrec_tt::tt_embedding_bag", "").typed<ForwardSignature>();
  return handle;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("torchrec_tt::tt_embedding_bag_backward", "")
                                 .typed<BackwardSignature>();
  return handle;
}

std::optional<at::Tensor> present(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class TTEmbeddingBagFunction : public torch::autograd::Function<TTEmbeddingBagFunction> {
 public:
  static at::Tensor forward(
      AutogradContext* ctx,
      at::TensorList cores,
      const at::Tensor& indices,
      const at::Tensor& offsets,
      const std::optional<at::Tensor>& per_sample_weights,
      int64_t pooling_mode,
      int64_t variant,
      const std::optional<at::Tensor>& plan,
      const std::optional<at::Tensor>& cache_weight,
      const std::optional<at::Tensor>& cache_ids) {
    at::Tensor out;
    {
      // The device kernel (or the fake one), not this function again.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = forward_op().call(
          cores, indices, offsets, per_sample_weights, pooling_mode, variant, plan, cache_weight, cache_ids);
    }
    // Absent optional tensors are saved as undefined ones (present() turns them back).
    variable_list saved(cores.begin(), cores.end());
    saved.insert(
        saved.end(),
        {indices, offsets, per_sample_weights.value_or(at::Tensor()), plan.value_or(at::Tensor()),
         cache_weight.value_or(at::Tensor()), cache_ids.value_or(at::Tensor())});
    ctx->save_for_backward(saved);
    ctx->saved_data["num_cores"] = static_cast<int64_t>(cores.size());
    ctx->saved_data["pooling_mode"] = pooling_mode;
    ctx->saved_data["variant"] = variant;
    ctx->saved_data["psw_requires_grad"] = per_sample_weights.has_value() && per_sample_weights->requires_grad();
    return out;
  }

  // One gradient per forward argument, the cores' list expanded: d cores, then indices, offsets,
  // per_sample_weights, pooling_mode, variant, plan, cache_weight, cache_ids.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const int64_t d = ctx->saved_data["num_cores"].toInt();
    const bool psw_requires_grad = ctx->saved_data["psw_requires_grad"].toBool();
    const std::vector<at::Tensor> cores(saved.begin(), saved.begin() + d);
    const at::Tensor& indices = saved[d];
    const at::Tensor& offsets = saved[d + 1];
    const std::optional<at::Tensor> cache_weight = present(saved[d + 4]);
    auto [core_grads, psw_grad, cache_grad] = backward_op().call(
        grad_outputs[0], cores, indices, offsets, present(saved[d + 2]),
        ctx->saved_data["pooling_mode"].toInt(), ctx->saved_data["variant"].toInt(), psw_requires_grad,
        present(saved[d + 3]), cache_weight, present(saved[d + 5]));
    variable_list grads(core_grads.begin(), core_grads.end());
    grads.insert(
        grads.end(),
        {at::Tensor(), at::Tensor(), psw_requires_grad ? psw_grad : at::Tensor(), at::Tensor(), at::Tensor(),
         at::Tensor(), cache_weight.has_value() ? cache_grad : at::Tensor(), at::Tensor()});
    return grads;
  }
};

// The Autograd-key kernel: TTEmbeddingBagFunction::apply with the op's unboxed signature.
template <typename Signature>
struct AutogradKernel;
template <typename... Args>
struct AutogradKernel<at::Tensor(Args...)> {
  static at::Tensor call(Args... args) {
    return TTEmbeddingBagFunction::apply(args...);
  }
};

} // namespace
} // namespace torchrec_tt

TORCH_LIBRARY_IMPL(torchrec_tt, Autograd, m) {
  m.impl("tt_embedding_bag", &torchrec_tt::AutogradKernel<torchrec_tt::ForwardSignature>::call);
}
