// The ops' `int pooling_mode` and `int variant` arguments. torchrec_tt/enums.py (PoolingMode,
// Variant: Python IntEnums) holds the same values. Plain C++ (no ATen) so that CUDA kernel files can
// include it.
#pragma once

#include <cstdint>

namespace torchrec_tt {

enum class PoolingMode : int64_t { kSum = 0, kMean = 1 };
enum class Variant : int64_t { kTT = 0, kGRT = 1 };

} // namespace torchrec_tt
