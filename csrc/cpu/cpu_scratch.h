// Thread-local scratch memory of the CPU kernels (csrc/cpu/): uninitialized arrays and grow-only
// per-thread arenas for the large per-call buffers.
#pragma once

#include <cstdint>
#include <memory>

namespace torchrec_tt::cpu {

// A scratch array whose entries are not initialized (std::vector would zero-fill, a full pass over
// memory the kernels overwrite anyway).
template <typename T>
class Scratch {
 public:
  void resize(int64_t n) {
    if (n > capacity_) {
      data_.reset(new T[static_cast<size_t>(n)]);
      capacity_ = n;
    }
  }
  T* data() {
    return data_.get();
  }
  const T* data() const {
    return data_.get();
  }

 private:
  std::unique_ptr<T[]> data_;
  int64_t capacity_ = 0;
};

// The large per-call buffers live in grow-only arenas of the calling thread: a fresh allocation
// would be mapped page by page on first touch, and the kernel's zeroing of those pages costs as much
// as the products that fill them (tens of MB per batch; about 9 us per 4 KB page on this project's
// VMs: 12 MB of fresh buffers per call added 25 ms to the 10M table's forward). A buffer stays
// valid until the next arena() call for the same (type, arena) on the same thread.
enum class Arena : int {
  kOutputs = 0,
  kCoreGrads,
  kChains,
  kSliceGrads,
  kSegments,
  kRows,
  kGroupedLookups, // lookups_by_group_cpu's records and their radix-sort copy
  kGroupedLookupsSwap,
  kCount
};

template <typename T>
T* arena(Arena which, int64_t n) {
  thread_local Scratch<T> buffers[static_cast<int>(Arena::kCount)];
  Scratch<T>& buf = buffers[static_cast<int>(which)];
  buf.resize(n);
  return buf.data();
}

} // namespace torchrec_tt::cpu
