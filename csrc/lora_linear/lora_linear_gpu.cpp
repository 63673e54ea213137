// LoraLinear::eval_gpu: the Metal kernels in lora_linear.metal, built on Apple only.
#include "lora_linear/lora_linear.h"

#ifdef _METAL_
#include <cstdint>

#include "metal.h"
#endif

namespace metapeft {

#ifdef _METAL_

constexpr const char* kOp = "lora_linear"; // for error messages

void LoraLinear::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& w = inputs[1];
  auto& a = inputs[2];
  auto& b = inputs[3];
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) {
    return;
  }
  bool per_task = a.ndim() == 3;
  bool has_bias = inputs.size() > 4;
  int nd = static_cast<int>(x.ndim());
  int64_t rows = prod(x.shape(), 0, nd - 1);
  int64_t M = prod(x.shape(), per_task ? 1 : 0, nd - 1);
  int64_t N = w.shape(-2);
  int64_t K = x.shape(-1);
  // As on the CPU, no low-rank term when it is empty (K == 0 or r == 0).
  int64_t R = K > 0 ? a.shape(-1) : 0;
  if (rows > INT32_MAX) {
    throw std::runtime_error("[metapeft.lora_linear] too many rows for the Metal kernel");
  }

  auto& s = stream();
  auto& enc = mx::metal::get_command_encoder(s);

  // h = x @ A, kept in float32 for the second pass.
  mx::array h({static_cast<int>(rows), static_cast<int>(R)}, mx::float32, nullptr, {});
  h.set_data(mx::allocator::malloc(h.nbytes()));
  if (R > 0) {
    auto down = get_kernel(s, "metapeft_lora_down");
    enc.set_compute_pipeline_state(down);
    enc.set_input_array(x, 0);
    enc.set_input_array(a, 1);
    enc.set_output_array(h, 2);
    enc.set_vector_bytes(x.shape(), 3);
    enc.set_vector_bytes(x.strides(), 4);
    enc.set_bytes(nd, 5);
    enc.set_vector_bytes(padded_strides(a, 3), 6);
    std::vector<int> down_dtypes = {dtype_code(x, kOp), dtype_code(a, kOp)};
    enc.set_vector_bytes(down_dtypes, 7);
    enc.set_bytes(M, 8);
    enc.set_bytes(K, 9);
    enc.set_bytes(R, 10);
    dispatch_2d(enc, down, R, rows);
  }

  auto kernel = get_kernel(s, "metapeft_lora_linear");
  enc.set_compute_pipeline_state(kernel);
  set_input(enc, x, 0);
  set_input(enc, w, 1);
  if (R > 0) {
    enc.set_input_array(h, 2);
    enc.set_input_array(b, 3);
  } else {
    set_placeholder(enc, 2);
    set_placeholder(enc, 3);
  }
  if (has_bias) {
    set_input(enc, inputs[4], 4);
  } else {
    set_placeholder(enc, 4);
  }
  enc.set_output_array(out, 5);
  enc.set_vector_bytes(x.shape(), 6);
  enc.set_vector_bytes(x.strides(), 7);
  enc.set_bytes(nd, 8);
  enc.set_vector_bytes(padded_strides(w, 3), 9);
  enc.set_vector_bytes(padded_strides(b, 3), 10);
  enc.set_vector_bytes(has_bias ? padded_strides(inputs[4], 2) : mx::Strides(2, 0), 11);
  std::vector<int> dtypes = {
      dtype_code(x, kOp),
      dtype_code(w, kOp),
      dtype_code(b, kOp),
      has_bias ? dtype_code(inputs[4], kOp) : -1,
      dtype_code(out, kOp)};
  enc.set_vector_bytes(dtypes, 12);
  enc.set_bytes(M, 13);
  enc.set_bytes(N, 14);
  enc.set_bytes(K, 15);
  enc.set_bytes(R, 16);
  float scale = scale_;
  enc.set_bytes(scale, 17);
  dispatch_2d(enc, kernel, N, rows);
  enc.add_temporary(std::move(h));
}

#else

void LoraLinear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.lora_linear] this build has no Metal kernels");
}

#endif

} // namespace metapeft
