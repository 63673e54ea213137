#include "rope/rope.h"

#include <cmath>

#include "mlx/fast.h"
#include "rows.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.rope] " + msg);
}

// Rotates rows [begin, end) of x (rows of D, L positions per group of rows) by
// the (L, half) angle tables; features from 2 * half on are copied.
METAPEFT_SIMD_CLONES
void rotate_rows(
    const float* x,
    float* y,
    const float* cos_t,
    const float* sin_t,
    int64_t begin,
    int64_t end,
    int64_t L,
    int64_t D,
    int64_t half,
    bool traditional) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    const float* c = cos_t + (r % L) * half;
    const float* s = sin_t + (r % L) * half;
    if (traditional) {
      for (int64_t i = 0; i < half; ++i) {
        float a = xr[2 * i], b = xr[2 * i + 1];
        yr[2 * i] = a * c[i] - b * s[i];
        yr[2 * i + 1] = a * s[i] + b * c[i];
      }
    } else {
      for (int64_t i = 0; i < half; ++i) {
        float a = xr[i], b = xr[i + half];
        yr[i] = a * c[i] - b * s[i];
        yr[i + half] = a * s[i] + b * c[i];
      }
    }
    std::copy(xr + 2 * half, xr + D, yr + 2 * half);
  }
}

} // namespace

mx::array rope(
    const mx::array& x,
    int dims,
    bool traditional,
    std::optional<float> base,
    float scale,
    int offset,
    const std::optional<mx::array>& freqs,
    bool inverse,
    mx::StreamOrDevice s) {
  check_float(x, "rope", "x");
  if (x.ndim() < 2) {
    fail("x must have shape (..., L, D), got " + shape_str(x.shape()));
  }
  if (dims <= 0 || dims % 2 || dims > x.shape(-1)) {
    fail("dims must be even, > 0 and at most D=" + std::to_string(x.shape(-1)) + ", got " +
         std::to_string(dims));
  }
  if (base.has_value() == freqs.has_value()) {
    fail("give exactly one of base and freqs");
  }
  if (freqs) {
    check_float(*freqs, "rope", "freqs");
    if (freqs->ndim() != 1 || freqs->shape(0) != dims / 2) {
      fail("freqs must have shape (" + std::to_string(dims / 2) + ",), got " +
           shape_str(freqs->shape()));
    }
  }
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    return mx::fast::rope(x, dims, traditional, base, inverse ? -scale : scale, offset, freqs, stream);
  }
  std::vector<mx::array> inputs = {x};
  if (freqs) {
    inputs.push_back(mx::astype(*freqs, mx::float32, stream));
  }
  return mx::array(
      x.shape(),
      x.dtype(),
      std::make_shared<RoPE>(stream, dims, traditional, base.value_or(0.0f), scale, offset, inverse),
      inputs);
}

void RoPE::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& x = inputs[0];
  auto& out = outputs[0];
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  if (x.size() == 0) {
    return;
  }
  int64_t D = x.shape(-1);
  int64_t L = x.shape(-2);
  int64_t rows = x.size() / D;
  std::optional<Operand> freqs;
  if (inputs.size() > 1) {
    freqs = operand(inputs[1]);
  }
  encoder.dispatch([xo = operand(x),
                    freqs,
                    out_ptr = out.data<void>(),
                    dtype = out.dtype(),
                    rows,
                    L,
                    D,
                    half = int64_t{dims_ / 2},
                    traditional = traditional_,
                    base = base_,
                    scale = scale_,
                    offset = offset_,
                    sign = inverse_ ? -1.0 : 1.0]() {
    // The angle tables, in double then rounded, as position * scale / period.
    std::vector<float> sf, cos_t(L * half), sin_t(L * half);
    const float* periods = freqs ? dense_float(*freqs, sf) : nullptr;
    for (int64_t i = 0; i < half; ++i) {
      double inv_period = periods ? 1.0 / periods[i]
                                  : std::pow(static_cast<double>(base), -static_cast<double>(i) / half);
      for (int64_t l = 0; l < L; ++l) {
        double angle = static_cast<double>(offset + l) * scale * inv_period;
        cos_t[l * half + i] = static_cast<float>(std::cos(angle));
        sin_t[l * half + i] = static_cast<float>(sign * std::sin(angle));
      }
    }
    std::vector<float> sx, so;
    const float* xp = dense_float(xo, sx);
    float* yp = float_output(out_ptr, dtype, rows * D, so);
    for_rows(rows, D, [&](int64_t begin, int64_t end) {
      rotate_rows(xp, yp, cos_t.data(), sin_t.data(), begin, end, L, D, half, traditional);
    });
    store_float_output(so, out_ptr, dtype);
  });
}

void RoPE::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.rope] has no Metal kernel: on the GPU, metapeft.ops.rope is mx.fast.rope");
}

std::vector<mx::Shape> RoPE::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

namespace {

std::optional<mx::array> periods_of(const std::vector<mx::array>& inputs) {
  return inputs.size() > 1 ? std::optional<mx::array>(inputs[1]) : std::nullopt;
}

} // namespace

std::vector<mx::array> RoPE::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  // A rotation's transpose is the opposite rotation. The periods get no gradient.
  auto freqs = periods_of(primals);
  auto base = freqs ? std::nullopt : std::optional<float>(base_);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(rope(cotangents[0], dims_, traditional_, base, scale_, offset_, freqs, !inverse_, stream()));
    } else {
      grads.push_back(mx::zeros_like(primals[arg], stream()));
    }
  }
  return grads;
}

std::vector<mx::array> RoPE::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  // Linear in x; the periods are treated as constants.
  auto freqs = periods_of(primals);
  auto base = freqs ? std::nullopt : std::optional<float>(base_);
  for (size_t i = 0; i < argnums.size(); ++i) {
    if (argnums[i] == 0) {
      return {rope(tangents[i], dims_, traditional_, base, scale_, offset_, freqs, inverse_, stream())};
    }
  }
  return {mx::zeros_like(primals[0], stream())};
}

std::pair<std::vector<mx::array>, std::vector<int>> RoPE::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  if (inputs.size() > 1 && axes[1] >= 0) {
    throw std::invalid_argument("[metapeft.rope] vmap over the periods (freqs) is not supported");
  }
  auto freqs = periods_of(inputs);
  auto base = freqs ? std::nullopt : std::optional<float>(base_);
  auto x = mx::moveaxis(inputs[0], axes[0], 0, stream());
  return {{rope(x, dims_, traditional_, base, scale_, offset_, freqs, inverse_, stream())}, {0}};
}

} // namespace metapeft
