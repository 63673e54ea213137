// Linear::eval_gpu: the Metal kernel in linear.metal, built on Apple only.
#include "linear/linear.h"

#ifdef _METAL_
#include <algorithm>
#include <cstdint>

#include "mlx/backend/metal/device.h"
#endif

namespace metapeft {

#ifdef _METAL_

namespace {

// The dtype code that linear.metal's load/store read.
int dtype_code(const mx::array& a) {
  if (a.dtype() == mx::float32) {
    return 0;
  }
  if (a.dtype() == mx::float16) {
    return 1;
  }
  if (a.dtype() == mx::bfloat16) {
    return 2;
  }
  throw std::runtime_error("[metapeft.linear] Metal kernels take float32, float16 or bfloat16");
}

// Binds a one-element array the kernel never reads (an empty or absent operand
// has no Metal buffer of its own).
void set_placeholder(mx::metal::CommandEncoder& enc, int idx) {
  mx::array placeholder(0.0f);
  enc.set_input_array(placeholder, idx);
  enc.add_temporary(std::move(placeholder));
}

void set_input(mx::metal::CommandEncoder& enc, const mx::array& a, int idx) {
  if (a.size() > 0) {
    enc.set_input_array(a, idx);
  } else {
    set_placeholder(enc, idx);
  }
}

// The strides of `a`, left-padded with zeros to `n` entries (a missing task
// axis is a broadcast one).
mx::Strides padded_strides(const mx::array& a, int n) {
  mx::Strides strides(n, 0);
  int extra = n - static_cast<int>(a.ndim());
  for (int ax = 0; ax < static_cast<int>(a.ndim()); ++ax) {
    strides[ax + extra] = a.strides()[ax];
  }
  return strides;
}

} // namespace

void Linear::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& w = inputs[1];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  bool per_task = w.ndim() == 3;
  bool has_bias = inputs.size() > 2;
  int nd = static_cast<int>(x.ndim());
  int64_t rows = prod(x.shape(), 0, nd - 1);
  int64_t M = prod(x.shape(), per_task ? 1 : 0, nd - 1);
  int64_t N = w.shape(-2);
  int64_t K = x.shape(-1);
  if (rows > INT32_MAX) {
    throw std::runtime_error("[metapeft.linear] too many rows for the Metal kernel");
  }

  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto lib = d.get_library("metapeft", binary_dir());
  auto kernel = d.get_kernel("metapeft_linear", lib);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);

  set_input(enc, x, 0);
  set_input(enc, w, 1);
  if (has_bias) {
    set_input(enc, inputs[2], 2);
  } else {
    set_placeholder(enc, 2);
  }
  enc.set_output_array(out, 3);
  enc.set_vector_bytes(x.shape(), 4);
  enc.set_vector_bytes(x.strides(), 5);
  enc.set_bytes(nd, 6);
  enc.set_vector_bytes(padded_strides(w, 3), 7);
  enc.set_vector_bytes(has_bias ? padded_strides(inputs[2], 2) : mx::Strides(2, 0), 8);
  std::vector<int> dtypes = {
      dtype_code(x), dtype_code(w), has_bias ? dtype_code(inputs[2]) : -1, dtype_code(out)};
  enc.set_vector_bytes(dtypes, 9);
  enc.set_bytes(M, 10);
  enc.set_bytes(N, 11);
  enc.set_bytes(K, 12);

  // One thread per output element: x over the N columns, y over the rows.
  size_t nx = N, ny = rows;
  size_t max_threads = kernel->maxTotalThreadsPerThreadgroup();
  size_t gx = std::min(nx, max_threads);
  size_t gy = std::min(ny, max_threads / gx);
  enc.dispatch_threads(MTL::Size(nx, ny, 1), MTL::Size(gx, gy, 1));
}

#else

void Linear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.linear] this build has no Metal kernels");
}

#endif

} // namespace metapeft
