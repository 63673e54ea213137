// Stress test of the worker pool (csrc/workers.cpp), built with ThreadSanitizer by
// tests/test_workers.py: callers on several threads post jobs of random sizes at
// once, and every chunk of every job must run exactly once.
#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "workers.h"

int main() {
  std::atomic<long> wrong{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&wrong, t] {
      for (int round = 0; round < 300; ++round) {
        int chunks = 2 + (round * 7 + t) % 60;
        std::vector<std::atomic<int>> hits(chunks);
        metapeft::run_chunks(chunks, [&hits](int c) { hits[c].fetch_add(1); });
        for (auto& h : hits) {
          wrong += h.load() != 1;
        }
      }
    });
  }
  for (auto& c : callers) {
    c.join();
  }
  std::printf("chunks run other than once: %ld\n", wrong.load());
  return wrong.load() != 0;
}
