// Schemas of every torchrec_tt op, defined once. Implementations register per device:
// csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (CUDA); fake kernels and autograd live in torchrec_tt/ops.py.
// Semantics: see DESIGN.md section 1 and the op docstrings in torchrec_tt/ops.py.

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
  // Groups the lookups of a batch by (bag, group), group = index // last_rows.
  // segments: distinct (bag, group) pairs ordered by (bag, group); slots: distinct groups, ascending.
  // All outputs are int64 and sized by upper bounds (nnz) so that no host sync is needed;
  // counts = [S, U] (number of segments, number of slots); entries past the counts are unspecified.
  m.def(
      "group_plan(Tensor indices, Tensor offsets, int last_rows) -> ("
      "Tensor lookup_segment, Tensor segment_bag, Tensor segment_group, Tensor segment_slot, "
      "Tensor slot_group, Tensor counts)");
  // Pooled TT embedding lookup: (B, N) in the cores' dtype.
  // pooling_mode: 0 = sum, 1 = mean; variant: 0 = tt (one chain per lookup), 1 = grt (group reduce).
  m.def(
      "tt_embedding_bag(Tensor[] cores, Tensor indices, Tensor offsets, "
      "Tensor? per_sample_weights, int pooling_mode, int variant) -> Tensor");
  // Gradients of tt_embedding_bag: dense core grads (shapes of the cores) and the per-sample-weight
  // grad ((nnz,) if per_sample_weights_requires_grad else an empty tensor).
  m.def(
      "tt_embedding_bag_backward(Tensor grad_output, Tensor[] cores, Tensor indices, "
      "Tensor offsets, Tensor? per_sample_weights, int pooling_mode, int variant, "
      "bool per_sample_weights_requires_grad) -> (Tensor[] core_grads, Tensor psw_grad)");
}
