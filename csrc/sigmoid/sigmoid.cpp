#include "sigmoid/sigmoid.h"

#include "rows.h"

namespace metapeft {

namespace {

METAPEFT_SIMD_CLONES
void sigmoid_range(const float* x, float* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += kLanes) {
    int64_t left = end - i;
    store(y + i, 1.0f / (1.0f + vec_exp(-load(x + i, left, 0.0f))), left);
  }
}

} // namespace

mx::array sigmoid(const mx::array& x, mx::StreamOrDevice s) {
  check_float(x, "sigmoid", "x");
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    return mx::sigmoid(x, stream);
  }
  return mx::array(x.shape(), x.dtype(), std::make_shared<Sigmoid>(stream), {x});
}

void Sigmoid::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& out = outputs[0];
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  int64_t n = x.size();
  if (n == 0) {
    return;
  }
  encoder.dispatch([xo = operand(x), out_ptr = out.data<void>(), dtype = out.dtype(), n]() {
    std::vector<float> sx, so;
    const float* xp = dense_float(xo, sx);
    float* yp = float_output(out_ptr, dtype, n, so);
    for_rows(n, 1, [&](int64_t begin, int64_t end) { sigmoid_range(xp, yp, begin, end); });
    store_float_output(so, out_ptr, dtype);
  });
}

void Sigmoid::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.sigmoid] has no Metal kernel: on the GPU, metapeft.ops.sigmoid is MLX's own");
}

std::vector<mx::Shape> Sigmoid::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

namespace {

// t * y * (1 - y), in float32, as y's dtype.
mx::array sigmoid_derivative(const mx::array& y, const mx::array& t, mx::Stream s) {
  auto yf = mx::astype(y, mx::float32, s);
  auto d = mx::multiply(mx::astype(t, mx::float32, s), mx::multiply(yf, mx::subtract(mx::array(1.0f), yf, s), s), s);
  return mx::astype(d, y.dtype(), s);
}

} // namespace

std::vector<mx::array> Sigmoid::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>& outputs) {
  return {sigmoid_derivative(outputs[0], cotangents[0], stream())};
}

std::vector<mx::array> Sigmoid::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>&) {
  return {sigmoid_derivative(metapeft::sigmoid(primals[0], stream()), tangents[0], stream())};
}

std::pair<std::vector<mx::array>, std::vector<int>> Sigmoid::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  return {{metapeft::sigmoid(inputs[0], stream())}, {axes[0]}};
}

} // namespace metapeft
