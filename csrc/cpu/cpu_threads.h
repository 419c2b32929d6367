// The threads the CPU kernels (csrc/cpu/) may split a pass over.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace torchrec_tt::cpu {

// Threads a parallel region may use here: one inside another region (a nested at::parallel_for
// runs inline), else the intra-op pool's size.
inline int64_t available_threads() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

} // namespace torchrec_tt::cpu
