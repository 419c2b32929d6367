// CPU emulation of the small CUDA subset used by the kernel files (csrc/cuda/*_cuda.cu and
// tt_cuda_common.cuh) -- a test vehicle only.
//
// Force it in first (g++ -include csrc/cuda_check/cuda_emu.h -x c++ file.cu) with a host C++20
// compiler (-std=c++20 -pthread -I<cuda>/include). Every CUDA thread of a block is a host thread;
// __syncthreads() / __syncwarp() are real barriers (a thread that skips one deadlocks the block, so
// non-uniform barriers show up as a hang), warp shuffles exchange through per-warp slots behind
// barriers, atomics are std::atomic_ref. Blocks run one after another, in reverse order (no code may
// rely on block order). Dynamic shared memory is filled with 0xff bytes (NaN for floats) before every
// block, and the test fills the workspace the same way, so reading something no thread wrote shows
// up in the results.
#pragma once

#define TORCHREC_TT_CUDA_EMU_H 1
#ifndef TORCHREC_TT_CUDA_EMULATION
#define TORCHREC_TT_CUDA_EMULATION 1
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <array>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace tt_emu {

struct Warp {
  explicit Warp(int size) : bar(size) {}
  std::barrier<> bar;
  std::array<std::array<unsigned char, 8>, 32> slots{};
};

struct Block {
  Block(int nthreads, size_t smem_bytes)
      : bar(nthreads), end_bar(nthreads), smem_size(smem_bytes) {
    for (int w = 0; w * 32 < nthreads; ++w) {
      const int size = nthreads - w * 32 < 32 ? nthreads - w * 32 : 32;
      warps.push_back(std::make_unique<Warp>(size));
    }
    smem.reset(new (std::align_val_t(64)) unsigned char[smem_bytes + 64]);
  }
  std::barrier<> bar; // __syncthreads
  std::barrier<> end_bar; // end of a block (separate, so a skipped __syncthreads deadlocks)
  std::vector<std::unique_ptr<Warp>> warps;
  struct AlignedDelete {
    void operator()(unsigned char* p) const {
      ::operator delete[](p, std::align_val_t(64));
    }
  };
  std::unique_ptr<unsigned char[], AlignedDelete> smem;
  size_t smem_size;
};

inline thread_local uint3 t_threadIdx;
inline thread_local uint3 t_blockIdx;
inline thread_local dim3 t_blockDim;
inline thread_local dim3 t_gridDim;
inline thread_local Block* t_block = nullptr;
inline thread_local int t_tid = 0;

inline unsigned char* dynamic_smem() {
  return t_block->smem.get();
}

inline Warp& my_warp() {
  return *t_block->warps[t_tid / 32];
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  Block st(nthreads, smem);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(nthreads));
  for (int tid = 0; tid < nthreads; ++tid) {
    threads.emplace_back([&, tid] {
      t_block = &st;
      t_tid = tid;
      t_threadIdx = uint3{
          static_cast<unsigned>(tid) % block.x, (static_cast<unsigned>(tid) / block.x) % block.y,
          static_cast<unsigned>(tid) / (block.x * block.y)};
      t_blockDim = block;
      t_gridDim = grid;
      // Blocks in reverse order: no code may rely on block order.
      for (unsigned bz = grid.z; bz-- > 0;) {
        for (unsigned by = grid.y; by-- > 0;) {
          for (unsigned bx = grid.x; bx-- > 0;) {
            if (tid == 0) {
              std::memset(st.smem.get(), 0xff, st.smem_size + 64);
            }
            st.end_bar.arrive_and_wait();
            t_blockIdx = uint3{bx, by, bz};
            kernel(args...);
            st.end_bar.arrive_and_wait();
          }
        }
      }
    });
  }
  for (auto& t : threads) {
    t.join();
  }
}

} // namespace tt_emu

#define threadIdx (::tt_emu::t_threadIdx)
#define blockIdx (::tt_emu::t_blockIdx)
#define blockDim (::tt_emu::t_blockDim)
#define gridDim (::tt_emu::t_gridDim)

inline void __syncthreads() {
  ::tt_emu::t_block->bar.arrive_and_wait();
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  ::tt_emu::my_warp().bar.arrive_and_wait();
}

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int /*width*/ = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  auto& w = ::tt_emu::my_warp();
  const int lane = ::tt_emu::t_tid % 32;
  std::memcpy(w.slots[lane].data(), &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r = v;
  const int src = lane ^ lane_mask;
  if (src < 32) {
    std::memcpy(&r, w.slots[src].data(), sizeof(T));
  }
  w.bar.arrive_and_wait();
  return r;
}

inline float atomicAdd(float* p, float v) {
  return std::atomic_ref<float>(*p).fetch_add(v);
}
inline double atomicAdd(double* p, double v) {
  return std::atomic_ref<double>(*p).fetch_add(v);
}
inline int atomicAdd(int* p, int v) {
  return std::atomic_ref<int>(*p).fetch_add(v);
}
inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_or(v);
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> a(*p);
  unsigned long long cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
