// Host-side helpers shared by the eval_gpu implementations (<op>/<op>_gpu.cpp).
// Include only under #ifdef _METAL_: it needs MLX's Metal backend.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.h"
#include "mlx/backend/metal/device.h"

namespace metapeft {

// The compute pipeline of kernel `name` in metapeft.metallib, which is
// installed next to the extension (MLX caches both the library and the kernel).
inline MTL::ComputePipelineState* get_kernel(const mx::Stream& s, const char* name) {
  auto& d = mx::metal::device(s.device);
  return d.get_kernel(name, d.get_library("metapeft", binary_dir()));
}

// The dtype code that load/store in kernels.h read: 0 float32, 1 float16,
// 2 bfloat16. `op` names the primitive in the error message.
inline int dtype_code(const mx::array& a, const char* op) {
  if (a.dtype() == mx::float32) {
    return 0;
  }
  if (a.dtype() == mx::float16) {
    return 1;
  }
  if (a.dtype() == mx::bfloat16) {
    return 2;
  }
  throw std::runtime_error(
      std::string("[metapeft.") + op + "] Metal kernels take float32, float16 or bfloat16");
}

// Binds a one-element array the kernel never reads (an empty or absent operand
// has no Metal buffer of its own).
inline void set_placeholder(mx::metal::CommandEncoder& enc, int idx) {
  mx::array placeholder(0.0f);
  enc.set_input_array(placeholder, idx);
  enc.add_temporary(std::move(placeholder));
}

// Binds `a`, or a placeholder when it is empty.
inline void set_input(mx::metal::CommandEncoder& enc, const mx::array& a, int idx) {
  if (a.size() > 0) {
    enc.set_input_array(a, idx);
  } else {
    set_placeholder(enc, idx);
  }
}

// The strides of `a`, left-padded with zeros to `n` entries (a missing task
// axis is a broadcast one).
inline mx::Strides padded_strides(const mx::array& a, int n) {
  mx::Strides strides(n, 0);
  int extra = n - static_cast<int>(a.ndim());
  for (int ax = 0; ax < static_cast<int>(a.ndim()); ++ax) {
    strides[ax + extra] = a.strides()[ax];
  }
  return strides;
}

// Gives `out` the buffer of the parameter `p` when it is ours to reuse (an
// update in place, as on the CPU), else a fresh one.
inline void reuse_or_alloc(mx::array& out, const mx::array& p) {
  if (p.size() > 0 && p.is_donatable() && p.flags().row_contiguous && p.dtype() == out.dtype() &&
      p.data_size() == p.size()) {
    out.copy_shared_buffer(p);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

// One thread per element: a 1D grid while it fits in 32 bits, else rows of 2^30
// (the kernel computes index = y * width + x and skips threads past n).
inline void dispatch_1d(
    mx::metal::CommandEncoder& enc,
    MTL::ComputePipelineState* kernel,
    size_t n) {
  size_t width = n <= UINT32_MAX ? n : (size_t(1) << 30);
  size_t height = (n + width - 1) / width;
  size_t group = std::min(width, static_cast<size_t>(kernel->maxTotalThreadsPerThreadgroup()));
  enc.dispatch_threads(MTL::Size(width, height, 1), MTL::Size(group, 1, 1));
}

// One thread per element of a (rows, cols) result: x over cols, y over rows.
inline void dispatch_2d(
    mx::metal::CommandEncoder& enc,
    MTL::ComputePipelineState* kernel,
    size_t cols,
    size_t rows) {
  size_t max_threads = kernel->maxTotalThreadsPerThreadgroup();
  size_t gx = std::min(cols, max_threads);
  size_t gy = std::min(rows, max_threads / gx);
  enc.dispatch_threads(MTL::Size(cols, rows, 1), MTL::Size(gx, gy, 1));
}

} // namespace metapeft
