#include "rms_norm/rms_norm.h"

#include <cmath>
#include <numeric>

#include "mlx/fast.h"
#include "rows.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.rms_norm] " + msg);
}

// The forward pass with MLX ops, in float32: what the derivatives of the
// fused kernels are taken from.
mx::array stock_rms_norm(const mx::array& x, const mx::array& w, float eps, mx::Stream s) {
  auto xf = mx::astype(x, mx::float32, s);
  auto ms = mx::mean(mx::square(xf, s), std::vector<int>{-1}, true, s);
  auto n = mx::multiply(xf, mx::rsqrt(mx::add(ms, mx::array(eps), s), s), s);
  return mx::multiply(n, mx::astype(w, mx::float32, s), s);
}

// (dx, dw) of <g, rms_norm(x, w)> with MLX ops, through mx::vjp of the forward.
std::vector<mx::array> stock_grads(
    const mx::array& x,
    const mx::array& w,
    const mx::array& g,
    float eps,
    mx::Stream s) {
  auto fn = [eps, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{stock_rms_norm(in[0], in[1], eps, s)};
  };
  auto grads = mx::vjp(fn, {x, w}, {mx::astype(g, mx::float32, s)}).second;
  return {mx::astype(grads[0], x.dtype(), s), mx::astype(grads[1], w.dtype(), s)};
}

// What RMSNormGrad computes, with MLX ops: its derivatives are taken from this.
std::vector<mx::array> stock_grad_outputs(
    const std::vector<mx::array>& in,
    float eps,
    bool per_entry,
    mx::Stream s) {
  if (!per_entry) {
    return stock_grads(in[0], in[1], in[2], eps, s);
  }
  auto each = [eps, s](const std::vector<mx::array>& one) {
    return stock_grads(one[0], one[1], one[2], eps, s);
  };
  return mx::vmap(each, {0, -1, 0})(in);
}

METAPEFT_INLINE float sum_of(Vec v) {
  float t = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    t += v[l];
  }
  return t;
}

// 1 / sqrt(mean(x^2) + eps) of one row.
METAPEFT_INLINE float inv_rms(const float* x, int64_t D, float eps) {
  Vec acc{};
  for (int64_t j = 0; j < D; j += kLanes) {
    Vec v = load(x + j, D - j, 0.0f);
    acc += v * v;
  }
  return 1.0f / std::sqrt(sum_of(acc) / static_cast<float>(D) + eps);
}

METAPEFT_SIMD_CLONES
void norm_rows(const float* x, const float* w, float* y, int64_t begin, int64_t end, int64_t D, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float inv = inv_rms(xr, D, eps);
    for (int64_t j = 0; j < D; j += kLanes) {
      int64_t left = D - j;
      store(yr + j, load(xr + j, left, 0.0f) * inv * load(w + j, left, 0.0f), left);
    }
  }
}

// dx rows and this chunk's partial dw (sum over its rows of g * x * inv_rms).
METAPEFT_SIMD_CLONES
void grad_rows(
    const float* x,
    const float* w,
    const float* g,
    float* dx,
    float* dw,
    int64_t begin,
    int64_t end,
    int64_t D,
    float eps) {
  std::fill(dw, dw + D, 0.0f);
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * D;
    const float* gr = g + r * D;
    float inv = inv_rms(xr, D, eps);
    Vec acc{};
    for (int64_t j = 0; j < D; j += kLanes) {
      int64_t left = D - j;
      Vec n = load(xr + j, left, 0.0f) * inv;
      Vec gv = load(gr + j, left, 0.0f);
      acc += gv * load(w + j, left, 0.0f) * n;
      store(dw + j, load(dw + j, left, 0.0f) + gv * n, left);
    }
    float c = sum_of(acc) / static_cast<float>(D);
    float* dr = dx + r * D;
    for (int64_t j = 0; j < D; j += kLanes) {
      int64_t left = D - j;
      Vec n = load(xr + j, left, 0.0f) * inv;
      Vec u = load(gr + j, left, 0.0f) * load(w + j, left, 0.0f);
      store(dr + j, (u - n * c) * inv, left);
    }
  }
}

} // namespace

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  check_float(x, "rms_norm", "x");
  check_float(weight, "rms_norm", "weight");
  if (x.ndim() < 1) {
    fail("x must have shape (..., D), got a scalar");
  }
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1)) {
    fail("weight must have shape (" + std::to_string(x.shape(-1)) + ",) to match x " +
         shape_str(x.shape()) + ", got " + shape_str(weight.shape()));
  }
  if (!(std::isfinite(eps) && eps >= 0)) {
    fail("eps must be finite and >= 0");
  }
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    return mx::fast::rms_norm(x, weight, eps, stream);
  }
  auto dtype = mx::promote_types(x.dtype(), weight.dtype());
  return mx::array(x.shape(), dtype, std::make_shared<RMSNorm>(stream, eps), {x, weight});
}

void RMSNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  auto& x = inputs[0];
  auto& out = outputs[0];
  if (x.size() == 0) {
    return;
  }
  int64_t D = x.shape(-1);
  int64_t rows = x.size() / D;
  encoder.dispatch([xo = operand(x),
                                                   wo = operand(inputs[1]),
                                                   out_ptr = out.data<void>(),
                                                   dtype = out.dtype(),
                                                   rows,
                                                   D,
                                                   eps = eps_]() {
    std::vector<float> sx, sw, so;
    const float* xp = dense_float(xo, sx);
    const float* wp = dense_float(wo, sw);
    float* yp = float_output(out_ptr, dtype, rows * D, so);
    for_rows(rows, D, [&](int64_t begin, int64_t end) {
      norm_rows(xp, wp, yp, begin, end, D, eps);
    });
    store_float_output(so, out_ptr, dtype);
  });
}

void RMSNormGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  auto& x = inputs[0];
  int64_t D = x.shape(-1);
  int64_t rows = D > 0 ? x.size() / D : 0;
  int64_t groups = per_entry_ ? x.shape(0) : 1;
  auto& dx = outputs[0];
  auto& dw = outputs[1];
  encoder.dispatch([xo = operand(x),
                                                   wo = operand(inputs[1]),
                                                   go = operand(inputs[2]),
                                                   dx_ptr = dx.data<void>(),
                                                   dx_dtype = dx.dtype(),
                                                   dw_ptr = dw.data<void>(),
                                                   dw_dtype = dw.dtype(),
                                                   rows,
                                                   groups,
                                                   D,
                                                   eps = eps_]() {
    std::vector<float> sx, sw, sg, sdx, sdw;
    float* dwp = float_output(dw_ptr, dw_dtype, groups * D, sdw);
    std::fill(dwp, dwp + groups * D, 0.0f);
    if (rows > 0) {
      const float* xp = dense_float(xo, sx);
      const float* wp = dense_float(wo, sw);
      const float* gp = dense_float(go, sg);
      float* dxp = float_output(dx_ptr, dx_dtype, rows * D, sdx);
      int64_t per_group = rows / groups;
      std::vector<float> partial(row_chunk_count(per_group, D) * D);
      for (int64_t grp = 0; grp < groups; ++grp) {
        int64_t first = grp * per_group;
        std::fill(partial.begin(), partial.end(), 0.0f);
        for_row_chunks(per_group, D, [&](int64_t c, int64_t begin, int64_t end) {
          grad_rows(xp, wp, gp, dxp, partial.data() + c * D, first + begin, first + end, D, eps);
        });
        for (size_t i = 0; i < partial.size(); ++i) {
          dwp[grp * D + static_cast<int64_t>(i) % D] += partial[i];
        }
      }
      store_float_output(sdx, dx_ptr, dx_dtype);
    }
    store_float_output(sdw, dw_ptr, dw_dtype);
  });
}

void RMSNorm::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.rms_norm] has no Metal kernel: on the GPU, metapeft.ops.rms_norm is MLX's own");
}

void RMSNormGrad::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.rms_norm] has no Metal kernel");
}

std::vector<mx::Shape> RMSNorm::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::Shape> RMSNormGrad::output_shapes(const std::vector<mx::array>& inputs) {
  auto dw = inputs[1].shape();
  if (per_entry_) {
    dw.insert(dw.begin(), inputs[0].shape(0));
  }
  return {inputs[0].shape(), dw};
}

std::vector<mx::array> RMSNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto grads = mx::array::make_arrays(
      {x.shape(), w.shape()},
      {x.dtype(), w.dtype()},
      std::make_shared<RMSNormGrad>(stream(), eps_),
      {x, w, cotangents[0]});
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

std::vector<mx::array> RMSNorm::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  auto fn = [eps = eps_, s](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{stock_rms_norm(in[0], in[1], eps, s)};
  };
  auto out = stock_jvp(fn, primals, tangents, argnums, s)[0];
  return {mx::astype(out, mx::promote_types(primals[0].dtype(), primals[1].dtype()), s)};
}

std::pair<std::vector<mx::array>, std::vector<int>> RMSNorm::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  auto dtype = mx::promote_types(inputs[0].dtype(), inputs[1].dtype());
  int V = vmap_size(inputs, axes);
  auto x = to_front(inputs[0], axes[0], V, s);
  if (axes[1] >= 0) {
    // One weight per mapped entry: MLX's ops broadcast it.
    std::vector<int> middle(x.ndim() - 2);
    std::iota(middle.begin(), middle.end(), 1);
    auto w = mx::expand_dims(mx::moveaxis(inputs[1], axes[1], 0, s), middle, s);
    return {{mx::astype(stock_rms_norm(x, w, eps_, s), dtype, s)}, {0}};
  }
  return {{rms_norm(x, inputs[1], eps_, s)}, {0}};
}

std::vector<mx::array> RMSNormGrad::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto fn = [eps = eps_, per_entry = per_entry_, s = stream()](const std::vector<mx::array>& in) {
    return stock_grad_outputs(in, eps, per_entry, s);
  };
  return stock_vjp(fn, primals, cotangents, argnums);
}

std::vector<mx::array> RMSNormGrad::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  auto fn = [eps = eps_, per_entry = per_entry_, s](const std::vector<mx::array>& in) {
    return stock_grad_outputs(in, eps, per_entry, s);
  };
  return stock_jvp(fn, primals, tangents, argnums, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> RMSNormGrad::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  if (axes[1] < 0 && !per_entry_) {
    // The usual case (a weight shared by the mapped entries): the fused kernel,
    // with the weight gradient summed per entry.
    int V = vmap_size(inputs, axes);
    auto x = to_front(inputs[0], axes[0], V, s);
    auto g = to_front(inputs[2], axes[2], V, s);
    auto& w = inputs[1];
    auto outs = mx::array::make_arrays(
        {x.shape(), {V, w.shape(0)}},
        {x.dtype(), w.dtype()},
        std::make_shared<RMSNormGrad>(s, eps_, true),
        {x, w, g});
    return {outs, {0, 0}};
  }
  auto fn = [eps = eps_, per_entry = per_entry_, s](const std::vector<mx::array>& in) {
    return stock_grad_outputs(in, eps, per_entry, s);
  };
  auto outs = mx::vmap(fn, axes)(inputs);
  return {outs, std::vector<int>(outs.size(), 0)};
}

} // namespace metapeft
