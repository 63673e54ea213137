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
inline MTL::ComputePipelineState* get_kernel(const mx::Stream& s, const std::string& name) {
  auto& d = mx::metal::device(s.device);
  return d.get_kernel(name, d.get_library("metapeft", binary_dir()));
}

// The kernel of `op` for the dtypes of `a`, `b` and `c`, by the name its .metal
// source instantiates it under ("metapeft_task_sgd_float32_bfloat16_float32").
inline std::string kernel_name(
    const char* op,
    const mx::array& a,
    const mx::array& b,
    const mx::array& c) {
  auto name = [op](const mx::array& x) -> std::string {
    if (x.dtype() == mx::float32) {
      return "float32";
    }
    if (x.dtype() == mx::float16) {
      return "float16";
    }
    if (x.dtype() == mx::bfloat16) {
      return "bfloat16";
    }
    throw std::runtime_error(
        std::string("[metapeft.") + op + "] Metal kernels take float32, float16 or bfloat16");
  };
  return std::string("metapeft_") + op + "_" + name(a) + "_" + name(b) + "_" + name(c);
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

} // namespace metapeft
