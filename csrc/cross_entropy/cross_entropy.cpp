#include "cross_entropy/cross_entropy.h"

#include <cmath>
#include <sstream>

#include "rows.h"
#include "softmax/softmax.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.cross_entropy] " + msg);
}

// The targets as (..., 1) int32 indices clipped into [0, V), for gathers and scatters.
mx::array target_index(const mx::array& targets, int V, mx::Stream s) {
  auto t = mx::clip(targets, mx::array(0, mx::int32), mx::array(V - 1, mx::int32), s);
  return mx::expand_dims(t, -1, s);
}

// logits[..., target]: the target's logit, in float32.
mx::array target_logit(const mx::array& logits, const mx::array& targets, mx::Stream s) {
  auto picked = mx::take_along_axis(logits, target_index(targets, logits.shape(-1), s), -1, s);
  return mx::astype(mx::squeeze(picked, std::vector<int>{-1}, s), mx::float32, s);
}

METAPEFT_SIMD_CLONES
void loss_rows(
    const float* x,
    const int32_t* t,
    float* loss,
    int64_t begin,
    int64_t end,
    int64_t V) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * V;
    float m = scaled_max(xr, V, 1.0f);
    float lse = m + std::log(exp_sum(xr, nullptr, V, 1.0f, m));
    int32_t target = t[r];
    loss[r] = (target >= 0 && target < V) ? lse - xr[target]
                                          : std::numeric_limits<float>::quiet_NaN();
  }
}

// d[r] = (softmax(x[r]) - onehot(t[r])) * g[r]; d may be x (in place).
METAPEFT_SIMD_CLONES
void grad_rows(
    const float* x,
    const int32_t* t,
    const float* g,
    float* d,
    int64_t begin,
    int64_t end,
    int64_t V) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * V;
    float* dr = d + r * V;
    float m = scaled_max(xr, V, 1.0f);
    float gr = g[r];
    scale_to_normal(dr, V, gr / exp_sum(xr, dr, V, 1.0f, m));
    int32_t target = t[r];
    if (target >= 0 && target < V) {
      dr[target] -= gr;
    }
  }
}

// (softmax(logits) - onehot(targets)) * g with MLX ops: what CrossEntropyGrad's
// derivatives are taken from.
mx::array stock_grad(const mx::array& logits, const mx::array& targets, const mx::array& g, mx::Stream s) {
  auto gf = mx::expand_dims(mx::astype(g, mx::float32, s), -1, s);
  auto p = softmax(mx::astype(logits, mx::float32, s), 1.0f, false, s);
  auto d = mx::multiply(p, gf, s);
  d = mx::scatter_add_axis(d, target_index(targets, logits.shape(-1), s), mx::negative(gf, s), -1, s);
  return mx::astype(d, logits.dtype(), s);
}

} // namespace

mx::array target_indices(
    const mx::array& targets,
    const mx::array& rows,
    const std::string& op,
    const std::string& rows_name,
    mx::Stream s) {
  if (!mx::issubdtype(targets.dtype(), mx::integer)) {
    std::ostringstream os;
    os << "[metapeft." << op << "] targets must have an integer dtype, got " << targets.dtype();
    throw DtypeError(os.str());
  }
  auto rows_shape = rows.shape();
  rows_shape.pop_back();
  if (targets.shape() != rows_shape) {
    throw std::invalid_argument(
        "[metapeft." + op + "] targets must have shape " + shape_str(rows_shape) + " (" + rows_name +
        " without its last axis), got " + shape_str(targets.shape()));
  }
  return mx::contiguous(mx::astype(targets, mx::int32, s), false, s);
}

mx::array cross_entropy_grad(
    const mx::array& logits,
    const mx::array& targets,
    const mx::array& g,
    mx::Stream s) {
  auto gf = mx::astype(g, mx::float32, s);
  return mx::array(
      logits.shape(), logits.dtype(), std::make_shared<CrossEntropyGrad>(s), {logits, targets, gf});
}

mx::array cross_entropy(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s) {
  check_float(logits, "cross_entropy", "logits");
  if (logits.ndim() < 1 || logits.shape(-1) < 1) {
    fail("logits must have shape (..., V) with V >= 1, got " + shape_str(logits.shape()));
  }
  auto stream = mx::to_stream(s);
  auto t = target_indices(targets, logits, "cross_entropy", "logits", stream);
  auto rows_shape = t.shape();
  if (stream.device == mx::Device::gpu) {
    auto lse = mx::logsumexp(mx::astype(logits, mx::float32, stream), std::vector<int>{-1}, false, stream);
    auto loss = mx::subtract(lse, target_logit(logits, t, stream), stream);
    auto ok = mx::logical_and(
        mx::greater_equal(t, mx::array(0), stream),
        mx::less(t, mx::array(logits.shape(-1)), stream),
        stream);
    return mx::where(ok, loss, mx::array(std::numeric_limits<float>::quiet_NaN()), stream);
  }
  return mx::array(rows_shape, mx::float32, std::make_shared<CrossEntropy>(stream), {logits, t});
}

void CrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& logits = inputs[0];
  auto& targets = inputs[1];
  auto& out = outputs[0];
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  if (out.size() == 0) {
    return;
  }
  int64_t V = logits.shape(-1);
  int64_t rows = out.size();
  encoder.dispatch([lo = operand(logits),
                    to = operand(targets),
                    loss = out.data<float>(),
                    rows,
                    V]() {
    std::vector<float> sx;
    const float* xp = dense_float(lo, sx);
    auto tp = static_cast<const int32_t*>(to.ptr);
    for_rows(rows, V, [&](int64_t begin, int64_t end) {
      loss_rows(xp, tp, loss, begin, end, V);
    });
  });
}

void CrossEntropy::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.cross_entropy] has no Metal kernel: on the GPU, metapeft.ops.cross_entropy "
      "is MLX's own ops");
}

std::vector<mx::Shape> CrossEntropy::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.pop_back();
  return {shape};
}

std::vector<mx::array> CrossEntropy::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto& logits = primals[0];
  auto& targets = primals[1];
  auto s = stream();
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg != 0) {
      grads.push_back(mx::zeros_like(targets, s));
      continue;
    }
    grads.push_back(cross_entropy_grad(logits, targets, cotangents[0], s));
  }
  return grads;
}

std::vector<mx::array> CrossEntropy::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto& logits = primals[0];
  auto s = stream();
  for (size_t i = 0; i < argnums.size(); ++i) {
    if (argnums[i] == 0) {
      // sum(softmax(logits) * t) - t[target]
      auto t = mx::astype(tangents[i], mx::float32, s);
      auto p = metapeft::softmax(mx::astype(logits, mx::float32, s), 1.0f, false, s);
      auto expected = mx::sum(mx::multiply(p, t, s), std::vector<int>{-1}, false, s);
      return {mx::subtract(expected, target_logit(t, primals[1], s), s)};
    }
  }
  return {mx::zeros(output_shapes(primals)[0], mx::float32, s)};
}

std::pair<std::vector<mx::array>, std::vector<int>> CrossEntropy::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  int V = vmap_size(inputs, axes);
  return {{cross_entropy(to_front(inputs[0], axes[0], V, s), to_front(inputs[1], axes[1], V, s), s)},
          {0}};
}

} // namespace metapeft

namespace metapeft {

void CrossEntropyGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& logits = inputs[0];
  auto& out = outputs[0];
  // In place when MLX allows it: the kernel reads a row before writing it.
  donate_or_allocate(logits, out);
  auto& encoder = cpu_encoder(stream(), inputs, outputs, false);
  if (out.size() == 0) {
    return;
  }
  int64_t V = logits.shape(-1);
  int64_t rows = out.size() / V;
  encoder.dispatch([lo = operand(logits),
                    to = operand(inputs[1]),
                    go = operand(inputs[2]),
                    out_ptr = out.data<void>(),
                    dtype = out.dtype(),
                    rows,
                    V]() {
    std::vector<float> sx, sg, so;
    const float* xp = dense_float(lo, sx);
    const float* gp = dense_float(go, sg);
    auto tp = static_cast<const int32_t*>(to.ptr);
    float* dp = float_output(out_ptr, dtype, rows * V, so);
    for_rows(rows, V, [&](int64_t begin, int64_t end) {
      grad_rows(xp, tp, gp, dp, begin, end, V);
    });
    store_float_output(so, out_ptr, dtype);
  });
}

void CrossEntropyGrad::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.cross_entropy] has no Metal kernel");
}

std::vector<mx::Shape> CrossEntropyGrad::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::array> CrossEntropyGrad::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto s = stream();
  auto targets = primals[1];
  auto fn = [targets, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{stock_grad(in[0], targets, in[1], s)};
  };
  auto grads = mx::vjp(fn, {primals[0], primals[2]}, cotangents).second;
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(arg == 0 ? grads[0] : arg == 2 ? grads[1] : mx::zeros_like(targets, s));
  }
  return out;
}

std::vector<mx::array> CrossEntropyGrad::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  auto targets = primals[1];
  std::vector<mx::array> t = {mx::zeros_like(primals[0], s), mx::zeros_like(primals[2], s)};
  for (size_t i = 0; i < argnums.size(); ++i) {
    if (argnums[i] != 1) {
      t[argnums[i] == 0 ? 0 : 1] = tangents[i];
    }
  }
  auto fn = [targets, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{stock_grad(in[0], targets, in[1], s)};
  };
  return mx::jvp(fn, {primals[0], primals[2]}, t).second;
}

std::pair<std::vector<mx::array>, std::vector<int>> CrossEntropyGrad::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  int V = vmap_size(inputs, axes);
  auto logits = to_front(inputs[0], axes[0], V, s);
  auto targets = mx::contiguous(to_front(inputs[1], axes[1], V, s), false, s);
  auto g = to_front(inputs[2], axes[2], V, s);
  return {{cross_entropy_grad(logits, targets, g, s)}, {0}};
}

} // namespace metapeft
