// Second translation unit of the compile-only check: includes every kernel header again so that
// .ci/compile_cuda.sh can link it with compile_check.cu (`ld -r`) and catch non-template kernels or
// non-inline functions defined in a header (multiply defined once two .cu files include it).

#include "../cuda/tt_backward.cuh"
#include "../cuda/tt_forward.cuh"
#include "../cuda/tt_group_plan.cuh"
#include "../cuda/tt_input_checks.cuh"

namespace torchrec_tt::gpu::compile_check {

int second_tu_marker() {
  return kWarpSize;
}

} // namespace torchrec_tt::gpu::compile_check
