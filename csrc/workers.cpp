#include "workers.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace metapeft {

int cpu_threads() {
  static const int n = []() {
    // A cap set for this process (ranks that share a host each take a share);
    // metapeft.distributed checks it is a positive integer before this loads.
    if (const char* cap = std::getenv("METAPEFT_NUM_THREADS")) {
      return std::max(1, std::atoi(cap));
    }
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
// sleeping thread (let alone an idle virtual CPU) takes tens of microseconds. In
// a model's step the jobs are apart by MLX's own single-threaded ops, mostly
// under 200 us.
constexpr auto kSpin = std::chrono::microseconds(200);

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

// One job: the caller's function and its chunks, claimed one by one. Workers hold
// the job by shared_ptr, so one that comes late finds its chunks all claimed and
// never calls a function whose caller has returned.
struct Job {
  const std::function<void(int)>* f;
  int chunks;
  std::atomic<int> next{0};
  std::atomic<int> done{0};
};

// Workers that help the calling thread through the chunks of one job at a time,
// with one mutex and two condition variables. Chunks are claimed one by one, so a
// worker that is slow to wake, or descheduled (MLX's own threads share the CPUs),
// delays the job by at most the chunk it holds, and the caller never waits for a
// worker that did not come. Threads spin for kSpin before they sleep. The pool
// lives until the process ends: detached workers may outlive static destructors.
class WorkerPool {
 public:
  WorkerPool() {
    for (int w = 0; w < std::min(cpu_threads() - 1, kMaxWorkers); ++w) {
      std::thread([this] { work(); }).detach();
    }
  }

  // False, having run nothing, when another caller has the pool.
  bool run(int chunks, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> caller(busy_, std::try_to_lock);
    if (!caller.owns_lock()) {
      return false;
    }
    auto job = std::make_shared<Job>();
    job->f = &f;
    job->chunks = chunks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    help(*job);
    auto finished = [&] { return job->done.load(std::memory_order_acquire) == chunks; };
    if (!spin_until(finished)) {
      std::unique_lock<std::mutex> lock(mutex_);
      all_done_.wait(lock, finished);
    }
    return true;
  }

 private:
  void help(Job& job) {
    for (int c; (c = job.next.fetch_add(1, std::memory_order_relaxed)) < job.chunks;) {
      (*job.f)(c);
      if (job.done.fetch_add(1, std::memory_order_acq_rel) + 1 == job.chunks) {
        std::lock_guard<std::mutex> lock(mutex_);
        all_done_.notify_one();
      }
    }
  }

  void work() {
    uint64_t seen = 0;
    auto posted = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    for (;;) {
      std::shared_ptr<Job> job;
      {
        if (!spin_until(posted)) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, posted);
        }
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_relaxed);
        job = job_;
      }
      help(*job);
    }
  }

  std::mutex busy_;  // held by the caller whose job runs
  std::mutex mutex_; // guards job_ and the waits
  std::condition_variable wake_, all_done_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0}; // jobs posted so far
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
