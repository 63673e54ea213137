#include "swiglu/swiglu.h"

#include "rows.h"

namespace metapeft {

namespace {

mx::array stock_swiglu(const mx::array& gate, const mx::array& up, mx::Stream s) {
  auto g = mx::astype(gate, mx::float32, s);
  return mx::multiply(mx::multiply(g, mx::sigmoid(g, s), s), mx::astype(up, mx::float32, s), s);
}

// What SwigluGrad computes, with MLX ops: its derivatives are taken from this.
std::vector<mx::array> stock_grads(const std::vector<mx::array>& in, mx::Stream s) {
  auto fn = [s](const std::vector<mx::array>& a) {
    return std::vector<mx::array>{stock_swiglu(a[0], a[1], s)};
  };
  auto grads = mx::vjp(fn, {in[0], in[1]}, {mx::astype(in[2], mx::float32, s)}).second;
  return {mx::astype(grads[0], in[0].dtype(), s), mx::astype(grads[1], in[1].dtype(), s)};
}

METAPEFT_INLINE Vec sigmoid_of(Vec g) {
  return 1.0f / (1.0f + vec_exp(-g));
}

METAPEFT_SIMD_CLONES
void forward_range(const float* gate, const float* up, float* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += kLanes) {
    int64_t left = end - i;
    Vec g = load(gate + i, left, 0.0f);
    store(y + i, g * sigmoid_of(g) * load(up + i, left, 0.0f), left);
  }
}

METAPEFT_SIMD_CLONES
void backward_range(
    const float* gate,
    const float* up,
    const float* cot,
    float* d_gate,
    float* d_up,
    int64_t begin,
    int64_t end) {
  for (int64_t i = begin; i < end; i += kLanes) {
    int64_t left = end - i;
    Vec g = load(gate + i, left, 0.0f);
    Vec c = load(cot + i, left, 0.0f);
    Vec sg = sigmoid_of(g);
    store(d_up + i, c * g * sg, left);
    store(d_gate + i, c * load(up + i, left, 0.0f) * sg * (1.0f + g * (1.0f - sg)), left);
  }
}

} // namespace

mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s) {
  check_float(gate, "swiglu", "gate");
  check_float(up, "swiglu", "up");
  if (gate.shape() != up.shape()) {
    throw std::invalid_argument(
        "[metapeft.swiglu] gate and up must have the same shape, got " + shape_str(gate.shape()) +
        " and " + shape_str(up.shape()));
  }
  auto stream = mx::to_stream(s);
  auto dtype = mx::promote_types(gate.dtype(), up.dtype());
  if (stream.device == mx::Device::gpu) {
    return mx::astype(stock_swiglu(gate, up, stream), dtype, stream);
  }
  return mx::array(gate.shape(), dtype, std::make_shared<Swiglu>(stream), {gate, up});
}

void Swiglu::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  auto& out = outputs[0];
  int64_t n = out.size();
  if (n == 0) {
    return;
  }
  encoder.dispatch([go = operand(inputs[0]),
                                                   uo = operand(inputs[1]),
                                                   out_ptr = out.data<void>(),
                                                   dtype = out.dtype(),
                                                   n]() {
    std::vector<float> sg, su, so;
    const float* gp = dense_float(go, sg);
    const float* up = dense_float(uo, su);
    float* yp = float_output(out_ptr, dtype, n, so);
    for_rows(n, 1, [&](int64_t begin, int64_t end) { forward_range(gp, up, yp, begin, end); });
    store_float_output(so, out_ptr, dtype);
  });
}

void SwigluGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  int64_t n = outputs[0].size();
  if (n == 0) {
    return;
  }
  encoder.dispatch([go = operand(inputs[0]),
                                                   uo = operand(inputs[1]),
                                                   co = operand(inputs[2]),
                                                   dg_ptr = outputs[0].data<void>(),
                                                   dg_dtype = outputs[0].dtype(),
                                                   du_ptr = outputs[1].data<void>(),
                                                   du_dtype = outputs[1].dtype(),
                                                   n]() {
    std::vector<float> sg, su, sc, sdg, sdu;
    const float* gp = dense_float(go, sg);
    const float* up = dense_float(uo, su);
    const float* cp = dense_float(co, sc);
    float* dgp = float_output(dg_ptr, dg_dtype, n, sdg);
    float* dup = float_output(du_ptr, du_dtype, n, sdu);
    for_rows(n, 1, [&](int64_t begin, int64_t end) {
      backward_range(gp, up, cp, dgp, dup, begin, end);
    });
    store_float_output(sdg, dg_ptr, dg_dtype);
    store_float_output(sdu, du_ptr, du_dtype);
  });
}

void Swiglu::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.swiglu] has no Metal kernel: on the GPU, metapeft.ops.swiglu is MLX's own ops");
}

void SwigluGrad::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.swiglu] has no Metal kernel");
}

std::vector<mx::Shape> Swiglu::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::Shape> SwigluGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape(), inputs[1].shape()};
}

std::vector<mx::array> Swiglu::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[1].shape()},
      {primals[0].dtype(), primals[1].dtype()},
      std::make_shared<SwigluGrad>(stream()),
      {primals[0], primals[1], cotangents[0]});
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

std::vector<mx::array> Swiglu::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  auto fn = [s](const std::vector<mx::array>& a) {
    return std::vector<mx::array>{stock_swiglu(a[0], a[1], s)};
  };
  auto out = stock_jvp(fn, primals, tangents, argnums, s)[0];
  return {mx::astype(out, mx::promote_types(primals[0].dtype(), primals[1].dtype()), s)};
}

std::pair<std::vector<mx::array>, std::vector<int>> Swiglu::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  int V = vmap_size(inputs, axes);
  return {{swiglu(to_front(inputs[0], axes[0], V, s), to_front(inputs[1], axes[1], V, s), s)}, {0}};
}

std::vector<mx::array> SwigluGrad::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto fn = [s = stream()](const std::vector<mx::array>& in) { return stock_grads(in, s); };
  return stock_vjp(fn, primals, cotangents, argnums);
}

std::vector<mx::array> SwigluGrad::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  auto fn = [s](const std::vector<mx::array>& in) { return stock_grads(in, s); };
  return stock_jvp(fn, primals, tangents, argnums, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> SwigluGrad::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  int V = vmap_size(inputs, axes);
  std::vector<mx::array> moved;
  for (size_t i = 0; i < inputs.size(); ++i) {
    moved.push_back(to_front(inputs[i], axes[i], V, s));
  }
  auto outs = mx::array::make_arrays(
      {moved[0].shape(), moved[1].shape()},
      {moved[0].dtype(), moved[1].dtype()},
      std::make_shared<SwigluGrad>(s),
      moved);
  return {outs, {0, 0}};
}

} // namespace metapeft
