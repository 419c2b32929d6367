// Schemas of every torchrec_tt op, defined once. Implementations register per device:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA), csrc/tt_embedding_bag_autograd.cpp (autograd, every
// device); fake kernels live in torchrec_tt/ops.py.
// Semantics: see docs/design.md section 1 and the op docstrings in torchrec_tt/ops.py.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import torchrec_tt._C` loads this library, which runs the static registrations below (and those
// of the device files). The module itself is empty: the ops are reached through torch.ops.torchrec_tt.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* name of module */
      nullptr, /* module documentation */
      -1, /* size of per-interpreter state of the module */
      nullptr, /* methods */
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torchrec_tt, m) {
  // The (bag, group) plan of a batch, group = index // last_rows, packed in one int64 tensor whose
  // layout is csrc/include/torchrec_tt/plan_layout.h (segments ordered by (bag, group), slots =
  // distinct groups ascending). Its size depends only on (nnz, B): no host sync is needed.
  // num_rows >= 0: the table's rows prod(m), against which the indices are checked where this
  // device checks values (CPU); -1: only non-negativity. cache_ids: the sorted distinct ids of a
  // hot-row cache (docs/design.md section 10); each bag's cached lookups form its cache segment
  // (CPU; the CUDA kernels take no cache).
  m.def(
      "group_plan(Tensor indices, Tensor offsets, int last_rows, int num_rows=-1, "
      "Tensor? cache_ids=None) -> Tensor");
  // Pooled TT embedding lookup: (B, N) in the cores' dtype. pooling_mode / variant: the
  // PoolingMode / Variant enums of checks.h. plan: group_plan(indices, offsets, m_{d-1}) of this
  // batch, built once and shared with the backward (grt only; built internally when absent).
  // cache_weight (K, N) / cache_ids (K,): a hot-row cache; cached lookups read cache_weight rows
  // instead of the cores (the plan must then be built with the same cache_ids).
  m.def(
      "tt_embedding_bag(Tensor[] cores, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int pooling_mode, int variant, Tensor? plan=None, "
      "Tensor? cache_weight=None, Tensor? cache_ids=None) -> Tensor");
  // Gradients of tt_embedding_bag: dense core grads (shapes of the cores), the per-sample-weight
  // grad ((nnz,) if per_sample_weights_requires_grad else an empty tensor) and the cache grad
  // ((K, N) with a cache, else an empty tensor).
  m.def(
      "tt_embedding_bag_backward(Tensor grad_output, Tensor[] cores, Tensor indices, "
      "Tensor offsets, Tensor? per_sample_weights, int pooling_mode, int variant, "
      "bool per_sample_weights_requires_grad, Tensor? plan=None, Tensor? cache_weight=None, "
      "Tensor? cache_ids=None) -> (Tensor[] core_grads, Tensor psw_grad, Tensor cache_grad)");
  // In-place sum of `tensor` over the world_size ranks of one host that share `segment` (uint8,
  // mapped from one shared-memory file by every rank; layout in csrc/cpu/shm_all_reduce_cpu.cpp).
  // step counts the calls on this segment from 1; every rank issues the same calls in the same
  // order, like any collective. Raises after timeout_s when a rank does not arrive.
  m.def(
      "shm_all_reduce_(Tensor(a!) tensor, Tensor(b!) segment, int rank, int world_size, int step, "
      "float timeout_s) -> ()");
}
