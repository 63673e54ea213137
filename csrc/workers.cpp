#include "workers.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace metapeft {

int cpu_threads() {
  static const int n = []() {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      return std::max(1, CPU_COUNT(&set));
    }
#endif
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

namespace {

// Workers beyond the caller: the elementwise kernels that share their work are
// bound by memory bandwidth, which a few threads already use up.
constexpr int kMaxWorkers = 7;

// How long a thread spins before it sleeps. Jobs come in runs, and waking a
// sleeping thread (let alone an idle virtual CPU) takes tens of microseconds.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spins until done() or kSpin has passed; returns done().
template <typename F>
bool spin_until(F done) {
  auto until = std::chrono::steady_clock::now() + kSpin;
  while (!done()) {
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() > until) {
      return done();
    }
  }
  return true;
}

// Workers that help the calling thread through the chunks of one job at a
// time. Chunks are claimed one by one, so a worker that is slow to wake, or
// descheduled (MLX's own threads share the CPUs), delays the job by at most
// the chunk it holds, and the caller never waits for a worker that did not
// come. The pool lives until the process ends: detached workers may outlive
// static destructors at exit.
class WorkerPool {
 public:
  WorkerPool() {
    for (int w = 0; w < std::min(cpu_threads() - 1, kMaxWorkers); ++w) {
      std::thread([this] { work(); }).detach();
    }
  }

  // False, having run nothing, when another caller has the pool.
  bool run(int chunks, const std::function<void(int)>& f) {
    if (busy_.exchange(true, std::memory_order_acquire)) {
      return false;
    }
    job_.store(&f, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    uint64_t id;
    bool sleepers;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      id = (state_.load() >> 32) + 1;
      state_.store(id << 32 | uint64_t(chunks) << 16, std::memory_order_release);
      sleepers = sleepers_ > 0;
    }
    if (sleepers) {
      wake_.notify_all();
    }
    help(id);
    auto finished = [&] { return done_.load(std::memory_order_acquire) == chunks; };
    if (!spin_until(finished)) {
      std::unique_lock<std::mutex> lock(mutex_);
      all_done_.wait(lock, finished);
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  // Runs chunks of job `id` until none is left. `state_` packs the job id (bits
  // 32-63), its chunk count (16-31) and its next chunk (0-15), so that one
  // compare-and-swap both checks that the job is still current and claims a
  // chunk of it; a job stays current until its chunks are all done, which
  // keeps `job_` valid while a claimed chunk runs.
  void help(uint64_t id) {
    uint64_t s = state_.load(std::memory_order_acquire);
    for (;;) {
      uint64_t next = s & 0xffff, chunks = (s >> 16) & 0xffff;
      if ((s >> 32) != id || next >= chunks) {
        return;
      }
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        continue;
      }
      (*job_.load(std::memory_order_relaxed))(static_cast<int>(next));
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == static_cast<int>(chunks)) {
        std::lock_guard<std::mutex> lock(mutex_);
        all_done_.notify_one();
      }
      s = state_.load(std::memory_order_acquire);
    }
  }

  void work() {
    uint64_t seen = 0;
    auto posted = [&] { return (state_.load(std::memory_order_acquire) >> 32) != seen; };
    for (;;) {
      if (!spin_until(posted)) {
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleepers_;
        wake_.wait(lock, posted);
        --sleepers_;
      }
      seen = state_.load(std::memory_order_acquire) >> 32;
      help(seen);
    }
  }

  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> state_{0};
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  std::atomic<int> done_{0};
  std::mutex mutex_;
  std::condition_variable wake_, all_done_;
  int sleepers_ = 0;
};

} // namespace

void run_chunks(int chunks, const std::function<void(int)>& f) {
  static WorkerPool* pool = new WorkerPool();
  if (chunks > 1 && chunks <= 0xffff && pool->run(chunks, f)) {
    return;
  }
  for (int c = 0; c < chunks; ++c) {
    f(c);
  }
}

} // namespace metapeft
