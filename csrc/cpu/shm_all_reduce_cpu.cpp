// CPU implementation of torchrec_tt::shm_all_reduce_: sums a tensor over the ranks of one host
// through a shared-memory segment that every rank has mapped (docs/design.md, section 9.1).
//
// Gloo moves an all-reduce through TCP on the loopback device: on the project's 2-core machine a
// 1 MB all-reduce between two ranks takes ~1.7 ms, as long as the TT step it synchronises. Ranks
// that share a host can instead copy into a common segment and each read the others' copies.
//
// Segment layout (bytes): world_size flags, one per 64-byte line (no false sharing), then
// world_size slots of `capacity` bytes. A rank's flag counts its progress through the calls
// (step s = 1, 2, ...): 2s-1 once its slot holds its step-s data, 2s once it has read every slot
// of step s. Initially (a zero-filled segment) every flag is 0 = "done with step 0".
//
//   step s, rank r:  wait every flag >= 2s-2   (nobody still reads step s-1's slots)
//                    copy tensor -> slot r;  flag r = 2s-1   (release)
//                    wait every flag >= 2s-1   (acquire: every slot holds step s)
//                    tensor = slot 0 + slot 1 + ... (in rank order: the same bits on every rank)
//                    flag r = 2s
//
// Waits spin briefly, then yield, then sleep (wait_for_every_flag), so ranks that outnumber the
// cores still progress; a rank that never arrives (it failed) turns into an error after
// timeout_s, not a hang.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace torchrec_tt::cpu {

namespace {

constexpr int64_t kFlagBytes = 64;  // one cache line per rank's flag
// A waiting rank spins for kSpinFor, then yields its core (returns at once when nothing else
// wants it, so ranks with a core each keep reacting within microseconds) until kYieldFor, then
// sleeps kSleep per check (ranks that outnumber the cores, or a long wait for a slow rank).
constexpr auto kSpinFor = std::chrono::microseconds(20);
constexpr auto kYieldFor = std::chrono::milliseconds(5);
constexpr auto kSleep = std::chrono::microseconds(20);
constexpr int64_t kSpinsPerClockRead = 64;
constexpr int64_t kSumGrain = 1 << 16;

static_assert(std::atomic<int64_t>::is_always_lock_free, "shared-memory flags need lock-free atomics");

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// The segment's header: the flags (slots start 64-byte aligned after it).
inline int64_t header_bytes(int64_t world_size) {
  return world_size * kFlagBytes;
}

inline std::atomic<int64_t>* flag_of(uint8_t* segment, int64_t rank) {
  return reinterpret_cast<std::atomic<int64_t>*>(segment + rank * kFlagBytes);
}

void wait_for_every_flag(
    uint8_t* segment,
    int64_t world_size,
    int64_t at_least,
    int64_t step,
    double timeout_s) {
  using Clock = std::chrono::steady_clock;
  std::optional<Clock::time_point> waiting_since;
  for (int64_t other = 0; other < world_size; ++other) {
    std::atomic<int64_t>* flag = flag_of(segment, other);
    int64_t spins = 0;
    while (flag->load(std::memory_order_acquire) < at_least) {
      if (++spins % kSpinsPerClockRead != 0) {
        cpu_relax();
        continue;
      }
      const Clock::time_point now = Clock::now();
      if (!waiting_since) {
        waiting_since = now;
      }
      const auto waited = now - *waiting_since;
      if (waited < kSpinFor) {
        continue;
      }
      if (std::chrono::duration<double>(waited).count() > timeout_s) {
        TORCH_CHECK(
            false,
            "shm_all_reduce_: rank ", other, " did not reach all-reduce step ", step, " within ",
            timeout_s, " s (flag ", flag->load(), ", expected >= ", at_least,
            "); a rank failed or the ranks issued different collectives");
      }
      if (waited < kYieldFor) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(kSleep);
      }
    }
  }
}

template <typename scalar_t>
void sum_slots(scalar_t* out, const uint8_t* slots, int64_t capacity, int64_t world_size, int64_t numel) {
  at::parallel_for(0, numel, kSumGrain, [&](int64_t begin, int64_t end) {
    const auto* first = reinterpret_cast<const scalar_t*>(slots);
    for (int64_t i = begin; i < end; ++i) {
      out[i] = first[i];
    }
    for (int64_t rank = 1; rank < world_size; ++rank) {
      const auto* slot = reinterpret_cast<const scalar_t*>(slots + rank * capacity);
      for (int64_t i = begin; i < end; ++i) {
        out[i] += slot[i];
      }
    }
  });
}

} // namespace

void shm_all_reduce_cpu(
    const at::Tensor& tensor,
    const at::Tensor& segment,
    int64_t rank,
    int64_t world_size,
    int64_t step,
    double timeout_s) {
  RECORD_FUNCTION("torchrec_tt::shm_all_reduce_", std::vector<c10::IValue>());
  TORCH_CHECK(world_size >= 1, "shm_all_reduce_: world_size must be >= 1, got ", world_size);
  TORCH_CHECK(
      rank >= 0 && rank < world_size, "shm_all_reduce_: rank must be in [0, ", world_size, "), got ",
      rank);
  TORCH_CHECK(step >= 1, "shm_all_reduce_: step must be >= 1, got ", step);
  TORCH_CHECK(
      tensor.is_contiguous() && (tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kDouble),
      "shm_all_reduce_: tensor must be a contiguous float32 or float64 CPU tensor, got ",
      tensor.scalar_type(), tensor.is_contiguous() ? "" : " (non-contiguous)");
  TORCH_CHECK(
      segment.is_contiguous() && segment.scalar_type() == at::kByte,
      "shm_all_reduce_: segment must be a contiguous uint8 tensor, got ", segment.scalar_type());
  const int64_t header = header_bytes(world_size);
  const int64_t capacity = (segment.numel() - header) / world_size;
  const int64_t nbytes = tensor.numel() * static_cast<int64_t>(tensor.element_size());
  TORCH_CHECK(
      capacity >= nbytes && capacity % kFlagBytes == 0,
      "shm_all_reduce_: a segment of ", segment.numel(), " bytes has ", world_size, " slots of ",
      capacity, " bytes, too small for a tensor of ", nbytes, " bytes (or not 64-byte aligned)");

  uint8_t* base = segment.data_ptr<uint8_t>();
  uint8_t* slots = base + header;
  std::atomic<int64_t>* own_flag = flag_of(base, rank);
  const int64_t done_before = 2 * step - 2;
  TORCH_CHECK(
      own_flag->load(std::memory_order_relaxed) == done_before,
      "shm_all_reduce_: rank ", rank, " is at flag ", own_flag->load(), ", expected ", done_before,
      " before step ", step, " (a previous all-reduce on this segment did not finish)");

  wait_for_every_flag(base, world_size, done_before, step, timeout_s);
  std::memcpy(slots + rank * capacity, tensor.data_ptr(), nbytes);
  own_flag->store(2 * step - 1, std::memory_order_release);
  wait_for_every_flag(base, world_size, 2 * step - 1, step, timeout_s);
  AT_DISPATCH_FLOATING_TYPES(tensor.scalar_type(), "shm_all_reduce_", [&] {
    sum_slots<scalar_t>(tensor.data_ptr<scalar_t>(), slots, capacity, world_size, tensor.numel());
  });
  own_flag->store(2 * step, std::memory_order_release);
}

} // namespace torchrec_tt::cpu

TORCH_LIBRARY_IMPL(torchrec_tt, CPU, m) {
  m.impl("shm_all_reduce_", &torchrec_tt::cpu::shm_all_reduce_cpu);
}
