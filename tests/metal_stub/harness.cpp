// metapeft's Metal kernels compiled as C++ against the stand-ins of this folder,
// as a shared library for ctypes: test_metal_stub.py runs each kernel on the CPU
// and compares it with the CPU primitive it mirrors.
#include "harness.h"

#include "reptile_update/reptile_update.metal"
#include "task_sgd/task_sgd.metal"

extern "C" {

// Runs kernel `name` for indices 0 .. size - 1 (a grid of width size, height 1);
// returns 1 when there is no kernel of that name.
int run_kernel(const char* name, void** args, int64_t size) {
  auto it = stub::kernels().find(name);
  if (it == stub::kernels().end()) {
    return 1;
  }
  uint2 grid{static_cast<uint32_t>(size), 1};
  for (int64_t i = 0; i < size; ++i) {
    it->second(args, uint2{static_cast<uint32_t>(i), 0}, grid);
  }
  return 0;
}

int kernel_count() {
  return static_cast<int>(stub::kernels().size());
}
}
