// TaskSGD::eval_gpu: the Metal kernel in task_sgd.metal, built on Apple only.
#include "task_sgd/task_sgd.h"

#ifdef _METAL_
#include <algorithm>
#include <cstdint>

#include "metal.h"
#endif

namespace metapeft {

#ifdef _METAL_

namespace {

constexpr const char* kOp = "task_sgd"; // for error messages

} // namespace

void TaskSGD::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  size_t n = outputs.size();
  auto& s = stream();
  auto& enc = mx::metal::get_command_encoder(s);

  for (size_t i = 0; i < n; ++i) {
    auto& p = inputs[i];
    auto& g = inputs[n + i];
    auto& lr = inputs[2 * n + i];
    auto& out = outputs[i];
    int64_t size = p.size();
    donate_or_allocate(p, out);
    if (size == 0) {
      continue;
    }
    auto kernel = get_kernel(s, kernel_name(kOp, p, g, lr));
    enc.set_compute_pipeline_state(kernel);
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
    enc.set_bytes(size, 9);
    dispatch_1d(enc, kernel, size);
  }
}

#else

void TaskSGD::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.task_sgd] this build has no Metal kernels");
}

#endif

} // namespace metapeft
