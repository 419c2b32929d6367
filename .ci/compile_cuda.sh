#!/usr/bin/env bash
# Compile-and-emulate check of the CUDA kernels -- no GPU needed (CI runs it on CPU machines).
#
#   1. nvcc compiles every kernel file (csrc/cuda/*.cu without a TORCH_LIBRARY registration: they
#      include only CUDA and project headers and explicitly instantiate their launchers for
#      float/double/half/bfloat16 cores and int32/int64 indices) with the flags torch's
#      CUDAExtension uses (-D__CUDA_NO_HALF_CONVERSIONS__ etc.); `ld -r` links them to catch
#      kernels or functions that a shared header defines twice.
#   2. The same kernel files are compiled as C++ with csrc/cuda_check/cuda_emu.h forced in, linked
#      with csrc/cuda_check/emu_test.cpp and run on CPU threads against a double-precision
#      reference (correctness, determinism, launch budgets).
#   3. If torch is importable, every csrc/cuda/*.cu -- the registration file tt_ops_cuda.cu included
#      -- is compiled against its headers as setup.py does (a CPU wheel lacks the generated
#      c10/cuda/impl/cuda_cmake_macros.h, which -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips; nothing is
#      linked).
#
# Environment: NVCC (default nvcc), CUDA_ARCH (default sm_90), EMU_ITERS (default 1),
# EMU_SANITIZE=1 (build the emulation with -fsanitize=address,undefined), SKIP_NVCC=1, SKIP_EMU=1,
# SKIP_TORCH_CU=1.
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

KERNEL_FILES=()
for f in csrc/cuda/*.cu; do
  if ! grep -q "TORCH_LIBRARY" "$f"; then KERNEL_FILES+=("$f"); fi
done

NVCC_FLAGS=(-std=c++17 "-arch=$CUDA_ARCH" -O3 --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xcompiler=-Wall -Werror=all-warnings -Icsrc/include)

# Runs the given commands two at a time; fails if any fails.
run_parallel() {
  local pids=() rc=0
  for cmd in "$@"; do
    bash -c "$cmd" & pids+=($!)
    if (( ${#pids[@]} >= 2 )); then wait "${pids[0]}" || rc=1; pids=("${pids[@]:1}"); fi
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}

if [[ "${SKIP_NVCC:-0}" != "1" ]]; then
  echo "== nvcc $("$NVCC" --version | tail -1) ($CUDA_ARCH): kernel files ${KERNEL_FILES[*]}"
  CMDS=()
  for f in "${KERNEL_FILES[@]}"; do
    CMDS+=("$(printf '%q ' "$NVCC" "${NVCC_FLAGS[@]}" -c "$f" -o "$OUT/$(basename "$f").o") && echo 'ok $f'")
  done
  run_parallel "${CMDS[@]}"
  ld -r "$OUT"/*.cu.o -o "$OUT/kernels_linked.o"
  echo "ok: linked ${#KERNEL_FILES[@]} kernel files"
fi

if [[ "${SKIP_EMU:-0}" != "1" ]]; then
  echo "== CPU emulation of the kernels vs a double-precision reference"
  # Tiny grids, so that the grid-stride loops are exercised.
  EMU_FLAGS=(-std=c++20 -O1 -g -pthread -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter
    -Wno-sign-compare -DTORCHREC_TT_MAX_GRID_BLOCKS=3 -I"$CUDA_INC" -Icsrc/include
    -include csrc/cuda_check/cuda_emu.h)
  if [[ "${EMU_SANITIZE:-0}" == "1" ]]; then
    EMU_FLAGS+=(-fsanitize=address,undefined -fno-sanitize-recover=undefined)
  fi
  mkdir -p "$OUT/emu"
  CMDS=()
  for f in "${KERNEL_FILES[@]}"; do
    CMDS+=("$(printf '%q ' "${CXX:-g++}" "${EMU_FLAGS[@]}" -x c++ -c "$f" -o "$OUT/emu/$(basename "$f").o")")
  done
  CMDS+=("$(printf '%q ' "${CXX:-g++}" "${EMU_FLAGS[@]}" -c csrc/cuda_check/emu_test.cpp -o "$OUT/emu/emu_test.o")")
  run_parallel "${CMDS[@]}"
  "${CXX:-g++}" "${EMU_FLAGS[@]}" "$OUT"/emu/*.o -o "$OUT/emu_test"
  timeout 1800 "$OUT/emu_test" "${EMU_ITERS:-1}" 12345
fi

if [[ "${SKIP_TORCH_CU:-0}" != "1" ]] && TORCH_INC="$(python -c 'import torch.utils.cpp_extension as c; print(" ".join(c.include_paths()))' 2>/dev/null)"; then
  echo "== csrc/cuda/*.cu against torch's headers (compile only)"
  INC=()
  for p in $TORCH_INC; do INC+=(-I"$p"); done
  CMDS=()
  for f in csrc/cuda/*.cu; do
    # C++20: torch >= 2.13 headers need it (the project's own sources are C++17).
    CMDS+=("$(printf '%q ' "$NVCC" -std=c++20 "-arch=$CUDA_ARCH" -O3 --expt-relaxed-constexpr \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
      -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DTORCHREC_TT_WITH_CUDA -DTORCH_EXTENSION_NAME=_C \
      -DTORCH_API_INCLUDE_EXTENSION_H -Icsrc/include "${INC[@]}" -c "$f" -o "$OUT/torch_$(basename "$f").o") && echo 'ok $f'")
  done
  run_parallel "${CMDS[@]}"
fi
echo "compile_cuda: all checks passed"
