// Linear::eval_gpu: the Metal kernel in linear.metal, built on Apple only.
#include "linear/linear.h"

#ifdef _METAL_
#include <cstdint>

#include "metal.h"
#endif

namespace metapeft {

#ifdef _METAL_

constexpr const char* kOp = "linear"; // for error messages

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
  auto kernel = get_kernel(s, "metapeft_linear");
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
      dtype_code(x, kOp),
      dtype_code(w, kOp),
      has_bias ? dtype_code(inputs[2], kOp) : -1,
      dtype_code(out, kOp)};
  enc.set_vector_bytes(dtypes, 9);
  enc.set_bytes(M, 10);
  enc.set_bytes(N, 11);
  enc.set_bytes(K, 12);

  dispatch_2d(enc, kernel, N, rows);
}

#else

void Linear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.linear] this build has no Metal kernels");
}

#endif

} // namespace metapeft
