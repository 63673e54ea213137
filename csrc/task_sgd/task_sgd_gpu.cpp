// TaskSGD::eval_gpu: the Metal kernel in task_sgd.metal, built on Apple only.
#include "task_sgd/task_sgd.h"

#ifdef _METAL_
#include <algorithm>
#include <cstdint>

#include "mlx/backend/metal/device.h"
#endif

namespace metapeft {

#ifdef _METAL_

namespace {

// The dtype code that task_sgd.metal's load/store read.
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
  throw std::runtime_error("[metapeft.task_sgd] Metal kernels take float32, float16 or bfloat16");
}

// Strides that read `a` at each index of an `ndim`-dimensional shape it
// broadcasts to (numpy rules: shapes right-aligned, stride 0 on a missing or
// size-1 axis).
mx::Strides broadcast_strides(const mx::array& a, int ndim) {
  mx::Strides strides(ndim, 0);
  int extra = ndim - static_cast<int>(a.ndim());
  for (int ax = 0; ax < static_cast<int>(a.ndim()); ++ax) {
    if (a.shape(ax) != 1) {
      strides[ax + extra] = a.strides()[ax];
    }
  }
  return strides;
}

// One thread per element: a 1D grid while it fits in 32 bits, else rows of 2^30.
void dispatch_1d(mx::metal::CommandEncoder& enc, MTL::ComputePipelineState* kernel, size_t n) {
  size_t width = n <= UINT32_MAX ? n : (size_t(1) << 30);
  size_t height = (n + width - 1) / width;
  size_t group = std::min(width, static_cast<size_t>(kernel->maxTotalThreadsPerThreadgroup()));
  enc.dispatch_threads(MTL::Size(width, height, 1), MTL::Size(group, 1, 1));
}

} // namespace

void TaskSGD::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  size_t n = outputs.size();
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto lib = d.get_library("metapeft", binary_dir());
  auto kernel = d.get_kernel("metapeft_task_sgd", lib);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);

  for (size_t i = 0; i < n; ++i) {
    auto& p = inputs[i];
    auto& g = inputs[n + i];
    auto& lr = inputs[2 * n + i];
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
    // A scalar leaf is indexed as shape (1,).
    int ndim = std::max(1, static_cast<int>(p.ndim()));
    mx::Shape shape = p.ndim() > 0 ? p.shape() : mx::Shape(1, 1);

    enc.set_input_array(p, 0);
    enc.set_input_array(g, 1);
    enc.set_input_array(lr, 2);
    enc.set_output_array(out, 3);
    enc.set_vector_bytes(shape, 4);
    enc.set_vector_bytes(broadcast_strides(p, ndim), 5);
    enc.set_vector_bytes(broadcast_strides(g, ndim), 6);
    enc.set_vector_bytes(broadcast_strides(lr, ndim), 7);
    enc.set_bytes(ndim, 8);
    std::vector<int> dtypes = {dtype_code(p), dtype_code(g), dtype_code(lr), dtype_code(out)};
    enc.set_vector_bytes(dtypes, 9);
    enc.set_bytes(size, 10);
    dispatch_1d(enc, kernel, size);
  }
}

#else

void TaskSGD::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.task_sgd] this build has no Metal kernels");
}

#endif

} // namespace metapeft
