// ReptileUpdate::eval_gpu: the Metal kernel in reptile_update.metal, built on Apple only.
#include "reptile_update/reptile_update.h"

#ifdef _METAL_
#include <algorithm>
#include <cstdint>

#include "mlx/backend/metal/device.h"
#endif

namespace metapeft {

#ifdef _METAL_

namespace {

// The dtype code that reptile_update.metal's load/store read.
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
  throw std::runtime_error(
      "[metapeft.reptile_update] Metal kernels take float32, float16 or bfloat16");
}

// Binds a one-element array the kernel never reads (an empty operand has no
// Metal buffer of its own).
void set_input(mx::metal::CommandEncoder& enc, const mx::array& a, int idx) {
  if (a.size() > 0) {
    enc.set_input_array(a, idx);
    return;
  }
  mx::array placeholder(0.0f);
  enc.set_input_array(placeholder, idx);
  enc.add_temporary(std::move(placeholder));
}

// One thread per element: a 1D grid while it fits in 32 bits, else rows of 2^30.
void dispatch_1d(mx::metal::CommandEncoder& enc, MTL::ComputePipelineState* kernel, size_t n) {
  size_t width = n <= UINT32_MAX ? n : (size_t(1) << 30);
  size_t height = (n + width - 1) / width;
  size_t group = std::min(width, static_cast<size_t>(kernel->maxTotalThreadsPerThreadgroup()));
  enc.dispatch_threads(MTL::Size(width, height, 1), MTL::Size(group, 1, 1));
}

} // namespace

void ReptileUpdate::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  size_t n = outputs.size();
  auto& eps = inputs.back();
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto lib = d.get_library("metapeft", binary_dir());
  auto kernel = d.get_kernel("metapeft_reptile_update", lib);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);

  for (size_t i = 0; i < n; ++i) {
    auto& p = inputs[i];
    auto& a = inputs[n + i];
    auto& out = outputs[i];
    int64_t size = p.size();
    // Update in place when the parameter's buffer is ours to reuse (as on the CPU).
    if (size > 0 && p.is_donatable() && p.flags().row_contiguous && p.dtype() == out.dtype() &&
        p.data_size() == p.size()) {
      out.copy_shared_buffer(p);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    if (size == 0) {
      continue;
    }
    // A scalar leaf is indexed as shape (1,); a's task axis is passed apart.
    int ndim = std::max(1, static_cast<int>(p.ndim()));
    mx::Shape shape = p.ndim() > 0 ? p.shape() : mx::Shape(1, 1);
    mx::Strides p_strides(ndim, 0);
    mx::Strides a_strides(ndim, 0);
    for (int ax = 0; ax < static_cast<int>(p.ndim()); ++ax) {
      p_strides[ax] = p.strides()[ax];
      a_strides[ax] = a.strides()[ax + 1];
    }
    int64_t tasks = a.shape(0);
    int64_t a_task_stride = a.strides()[0];

    enc.set_input_array(p, 0);
    set_input(enc, a, 1);
    enc.set_input_array(eps, 2);
    enc.set_output_array(out, 3);
    enc.set_vector_bytes(shape, 4);
    enc.set_vector_bytes(p_strides, 5);
    enc.set_vector_bytes(a_strides, 6);
    enc.set_bytes(ndim, 7);
    std::vector<int> dtypes = {dtype_code(p), dtype_code(a), dtype_code(eps), dtype_code(out)};
    enc.set_vector_bytes(dtypes, 8);
    enc.set_bytes(size, 9);
    enc.set_bytes(tasks, 10);
    enc.set_bytes(a_task_stride, 11);
    dispatch_1d(enc, kernel, size);
  }
}

#else

void ReptileUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.reptile_update] this build has no Metal kernels");
}

#endif

} // namespace metapeft
