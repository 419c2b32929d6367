// Thread-local scratch memory of the CPU kernels (csrc/cpu/): uninitialized arrays and grow-only
// per-thread arenas for the large per-call buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>

namespace torchrec_tt::cpu {

// A scratch array whose entries are not initialized (std::vector would zero-fill, a full pass over
// memory the kernels overwrite anyway), aligned to a cache line so that the micro-kernels' 32-byte
// vector loads and stores never straddle two lines (malloc aligns to 16 bytes). T is trivially
// constructible and destructible.
template <typename T>
class Scratch {
 public:
  static constexpr size_t kAlignment = 64;

  Scratch() = default;
  explicit Scratch(int64_t n) {
    resize(n);
  }
  void resize(int64_t n) {
    if (n > capacity_) {
      data_.reset(static_cast<T*>(
          ::operator new[](static_cast<size_t>(n) * sizeof(T), std::align_val_t{kAlignment})));
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
  struct Free {
    void operator()(T* p) const {
      ::operator delete[](p, std::align_val_t{kAlignment});
    }
  };
  std::unique_ptr<T, Free> data_;
  int64_t capacity_ = 0;
};

// The large per-call buffers live in grow-only arenas of the calling thread: a fresh allocation
// would be mapped page by page on first touch, and the kernel's zeroing of those pages costs as much
// as the products that fill them (tens of MB per batch; about 8 us per 4 KB page on this project's
// VMs: 11.6 MB of fresh buffers per call made the 10M table's forward 50.6 instead of 28.9 ms). A buffer stays
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
  kLookupRows, // the plan-free row path's per-lookup rows (one worker's lookups)
  kRowMarks, // distinct_rows_cpu's row marks (one byte per row and marking thread)
  kRowCodes, // group_plan's table row codes (cache_row_codes_cpu)
  kPlanSortedGroups, // build_group_plan_cpu's per-lookup groups
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
