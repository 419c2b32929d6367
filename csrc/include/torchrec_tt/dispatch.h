// Dispatch helpers shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace torchrec_tt {

// Accumulation type: float for float/half/bfloat16, double for double (ATen's opmath type; note that
// at::acc_type<float, /*is_cuda=*/false> would be double).
template <typename scalar_t>
using acc_type_t = at::opmath_type<scalar_t>;

} // namespace torchrec_tt

// Core dtypes on CPU: float32 and float64 (binds scalar_t).
#define TORCHREC_TT_DISPATCH_CPU_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)

// Core dtypes on CUDA: float32, float64, float16, bfloat16 (binds scalar_t).
#define TORCHREC_TT_DISPATCH_CUDA_FLOAT_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// indices/offsets dtypes: int32 and int64 (binds index_t).
#define TORCHREC_TT_DISPATCH_INDEX_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)
