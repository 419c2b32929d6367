#!/usr/bin/env bash
# Compile-only check of the CUDA kernels -- no GPU needed (CI runs it on CPU machines).
#
#   1. nvcc compiles csrc/cuda_check/compile_check.cu, which instantiates every kernel template of
#      csrc/cuda/*.cuh for float/double/half/bfloat16 cores and int32/int64 indices, with the flags
#      torch's CUDAExtension uses (-D__CUDA_NO_HALF_CONVERSIONS__ etc.), plus a second translation
#      unit; `ld -r` links the two to catch kernels defined twice by a header.
#   2. The same kernels run on CPU threads (csrc/cuda_check/cuda_emu.h) against a double-precision
#      reference (csrc/cuda_check/emu_test.cpp): g++ -std=c++20.
#   3. If torch is importable, the thin csrc/cuda/*.cu files are compiled against its headers (a CPU
#      wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, which
#      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips; nothing is linked).
#
# Environment: NVCC (default nvcc), CUDA_ARCH (default sm_90), EMU_ITERS (default 1),
# EMU_SANITIZE=1 (build the emulation test with -fsanitize=address,undefined),
# SKIP_EMU=1, SKIP_TORCH_CU=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NVCC="${NVCC:-nvcc}"
CUDA_ARCH="${CUDA_ARCH:-sm_90}"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
# CUDA headers for the host-compiled emulation (nvcc may be a wrapper script, so try a few places).
CUDA_INC=""
for c in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
  if [[ -n "$c" && -f "$c/include/cuda_runtime.h" ]]; then CUDA_INC="$c/include"; break; fi
done
if [[ -z "$CUDA_INC" ]]; then
  CUDA_INC="$("$NVCC" --dryrun -x cu -c /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)"
fi

NVCC_FLAGS=(-std=c++17 "-arch=$CUDA_ARCH" -O3 --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler=-Wall -Werror=all-warnings -Icsrc/include)

echo "== nvcc $("$NVCC" --version | tail -1) ($CUDA_ARCH): kernel headers"
"$NVCC" "${NVCC_FLAGS[@]}" -c csrc/cuda_check/compile_check.cu -o "$OUT/compile_check.o"
"$NVCC" "${NVCC_FLAGS[@]}" -c csrc/cuda_check/compile_check_second_tu.cu -o "$OUT/second_tu.o"
ld -r "$OUT/compile_check.o" "$OUT/second_tu.o" -o "$OUT/linked.o"
echo "ok"

if [[ "${SKIP_EMU:-0}" != "1" ]]; then
  echo "== CPU emulation of the kernels vs a double-precision reference"
  # Tiny grids and chunks, so that the grid-stride loops and the multi-chunk runs are exercised.
  EMU_FLAGS=(-std=c++20 -O1 -g -pthread -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter
    -Wno-sign-compare -DTORCHREC_TT_MAX_GRID_BLOCKS=3 -DTORCHREC_TT_CHUNK_ITEMS=3
    -I"$CUDA_INC" -Icsrc/include)
  if [[ "${EMU_SANITIZE:-0}" == "1" ]]; then
    EMU_FLAGS+=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
  fi
  "${CXX:-g++}" "${EMU_FLAGS[@]}" csrc/cuda_check/emu_test.cpp -o "$OUT/emu_test"
  timeout 1800 "$OUT/emu_test" "${EMU_ITERS:-1}" 12345
fi

if [[ "${SKIP_TORCH_CU:-0}" != "1" ]] && TORCH_INC="$(python -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"; then
  echo "== csrc/cuda/*.cu against torch's headers (compile only)"
  INC=()
  for p in $TORCH_INC; do INC+=(-I"$p"); done
  for f in csrc/cuda/*.cu; do
    # C++20: torch >= 2.13 headers need it (the project's own sources are C++17).
    "$NVCC" -std=c++20 "-arch=$CUDA_ARCH" -O3 --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCHREC_TT_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
      -DTORCH_API_INCLUDE_EXTENSION_H -Icsrc/include "${INC[@]}" -c "$f" -o "$OUT/$(basename "$f").o"
    echo "ok $f"
  done
fi
echo "compile_cuda: all checks passed"
