// ReptileUpdate::eval_gpu: the Metal kernel in reptile_update.metal, built on Apple only.
#include "reptile_update/reptile_update.h"

#ifdef _METAL_
#include <algorithm>
#include <cstdint>

#include "metal.h"
#endif

namespace metapeft {

#ifdef _METAL_

constexpr const char* kOp = "reptile_update"; // for error messages

void ReptileUpdate::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  size_t n = outputs.size();
  auto& eps = inputs.back();
  auto& s = stream();
  auto& enc = mx::metal::get_command_encoder(s);

  for (size_t i = 0; i < n; ++i) {
    auto& p = inputs[i];
    auto& a = inputs[n + i];
    auto& out = outputs[i];
    int64_t size = p.size();
    donate_or_allocate(p, out);
    if (size == 0) {
      continue;
    }
    auto kernel = get_kernel(s, kernel_name(kOp, p, a, eps));
    enc.set_compute_pipeline_state(kernel);
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
    enc.set_bytes(size, 8);
    enc.set_bytes(tasks, 9);
    enc.set_bytes(a_task_stride, 10);
    dispatch_1d(enc, kernel, size);
  }
}

#else

void ReptileUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.reptile_update] this build has no Metal kernels");
}

#endif

} // namespace metapeft
