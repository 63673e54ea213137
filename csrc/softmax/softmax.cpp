#include "softmax/softmax.h"

#include <cmath>

#include "rows.h"

namespace metapeft {

namespace {

// MLX's own ops for the same result: the GPU path, where MLX's kernels are fast.
mx::array stock_softmax(const mx::array& x, float scale, bool causal, mx::StreamOrDevice s) {
  auto y = mx::multiply(mx::astype(x, mx::float32, s), mx::array(scale), s);
  if (causal) {
    int L = x.shape(-2), S = x.shape(-1);
    auto rows = mx::reshape(mx::arange(L, s), {L, 1}, s);
    auto keep = mx::less_equal(mx::arange(S, s), mx::add(rows, mx::array(S - L), s), s);
    y = mx::where(keep, y, mx::array(-std::numeric_limits<float>::infinity()), s);
    auto p = mx::softmax(y, std::vector<int>{-1}, true, s);
    return mx::astype(mx::where(keep, p, mx::array(0.0f), s), x.dtype(), s);
  }
  return mx::astype(mx::softmax(y, std::vector<int>{-1}, true, s), x.dtype(), s);
}

METAPEFT_SIMD_CLONES
void softmax_rows(
    const float* x,
    float* y,
    int64_t begin,
    int64_t end,
    int64_t L,
    int64_t S,
    float scale,
    bool causal) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * S;
    float* yr = y + r * S;
    int64_t seen = causal ? std::clamp<int64_t>(r % L + S - L + 1, 0, S) : S;
    if (seen > 0) {
      float m = scaled_max(xr, seen, scale);
      scale_to_normal(yr, seen, 1.0f / exp_sum(xr, yr, seen, scale, m));
    }
    std::fill(yr + seen, yr + S, 0.0f);
  }
}

} // namespace

mx::array softmax(const mx::array& x, float scale, bool causal, mx::StreamOrDevice s) {
  check_float(x, "softmax", "x");
  if (x.ndim() < (causal ? 2 : 1)) {
    throw std::invalid_argument(
        std::string("[metapeft.softmax] x must have shape ") +
        (causal ? "(..., L, S) with a causal mask" : "(..., n)") + ", got " +
        shape_str(x.shape()));
  }
  if (!std::isfinite(scale)) {
    throw std::invalid_argument("[metapeft.softmax] scale must be finite");
  }
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    return stock_softmax(x, scale, causal, stream);
  }
  return mx::array(
      x.shape(), x.dtype(), std::make_shared<Softmax>(stream, scale, causal), {x});
}

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& out = outputs[0];
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  if (x.size() == 0) {
    return;
  }
  int64_t S = x.shape(-1);
  int64_t L = x.ndim() > 1 ? x.shape(-2) : 1;
  int64_t rows = x.size() / S;
  encoder.dispatch([xo = operand(x),
                    out_ptr = out.data<void>(),
                    dtype = out.dtype(),
                    rows,
                    L,
                    S,
                    scale = scale_,
                    causal = causal_]() {
    std::vector<float> sx, so;
    const float* xp = dense_float(xo, sx);
    float* yp = float_output(out_ptr, dtype, rows * S, so);
    for_rows(rows, S, [&](int64_t begin, int64_t end) {
      softmax_rows(xp, yp, begin, end, L, S, scale, causal);
    });
    store_float_output(so, out_ptr, dtype);
  });
}

void Softmax::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.softmax] has no Metal kernel: on the GPU, metapeft.ops.softmax is MLX's own");
}

std::vector<mx::Shape> Softmax::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

namespace {

// scale * y * (t - sum(t * y)): the softmax's derivative applied to t, in float32.
mx::array softmax_derivative(const mx::array& y, const mx::array& t, float scale, mx::Stream s) {
  auto yf = mx::astype(y, mx::float32, s);
  auto tf = mx::astype(t, mx::float32, s);
  auto inner = mx::sum(mx::multiply(tf, yf, s), std::vector<int>{-1}, true, s);
  return mx::multiply(mx::multiply(yf, mx::subtract(tf, inner, s), s), mx::array(scale), s);
}

} // namespace

std::vector<mx::array> Softmax::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>& outputs) {
  auto d = softmax_derivative(outputs[0], cotangents[0], scale_, stream());
  return {mx::astype(d, primals[0].dtype(), stream())};
}

std::vector<mx::array> Softmax::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>&) {
  auto y = metapeft::softmax(primals[0], scale_, causal_, stream());
  return {mx::astype(softmax_derivative(y, tangents[0], scale_, stream()), y.dtype(), stream())};
}

std::pair<std::vector<mx::array>, std::vector<int>> Softmax::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  // Rows are independent, and the mask reads the last two axes of the mapped
  // function's input, which stay last when the mapped axis goes first.
  auto x = mx::moveaxis(inputs[0], axes[0], 0, stream());
  return {{metapeft::softmax(x, scale_, causal_, stream())}, {0}};
}

} // namespace metapeft
