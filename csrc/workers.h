// The threads the kernels share their work with: the elementwise updates, and
// per-task products too small for OpenBLAS's own threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

namespace metapeft {

// The CPUs this process may run on, or METAPEFT_NUM_THREADS when set.
int cpu_threads();

// Calls f(0), ..., f(chunks - 1) on the calling thread and on whichever
// long-lived workers join in (up to 7, and fewer than cpu_threads()), and
// returns when all are done; all run on the caller when another caller has
// the workers. f must not throw. Like MLX's own stream threads, the workers do
// not survive fork().
void run_chunks(int chunks, const std::function<void(int)>& f);

// Runs f(leaf, begin, end) over the elements of leaves of the given sizes (as
// if laid end to end), in contiguous chunks of about `chunk_size` elements.
template <typename F>
void for_ranges(const std::vector<int64_t>& sizes, int64_t chunk_size, F f) {
  int64_t total = 0;
  for (auto n : sizes) {
    total += n;
  }
  auto run = [&](int64_t lo, int64_t hi) {
    int64_t base = 0;
    for (size_t leaf = 0; leaf < sizes.size() && base < hi; base += sizes[leaf], ++leaf) {
      int64_t b = std::max(lo, base), e = std::min(hi, base + sizes[leaf]);
      if (b < e) {
        f(leaf, b - base, e - base);
      }
    }
  };
  int64_t chunks = std::min<int64_t>(total / std::max<int64_t>(chunk_size, 1), 0xffff);
  if (cpu_threads() == 1 || chunks <= 1) {
    run(0, total);
    return;
  }
  int64_t chunk = (total + chunks - 1) / chunks;
  run_chunks(static_cast<int>(chunks), [&](int c) {
    run(c * chunk, std::min(total, (c + 1) * chunk));
  });
}

} // namespace metapeft
