// Helpers of the row-wise kernels (softmax, cross_entropy, sigmoid): an exp on
// 16 floats at a time, written with GCC/Clang vector types so that it compiles
// to the widest vector unit of each target_clones variant, and a loop over
// rows shared with the workers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/transforms.h"
#include "workers.h"

namespace metapeft {

constexpr int kLanes = 16;
using Vec = float __attribute__((vector_size(kLanes * sizeof(float))));
using IVec = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

#define METAPEFT_INLINE __attribute__((always_inline)) inline

METAPEFT_INLINE Vec splat(float v) {
  return Vec{} + v;
}

// mask ? a : b, lane by lane (mask lanes are all ones or all zeros).
METAPEFT_INLINE Vec select(IVec mask, Vec a, Vec b) {
  return reinterpret_cast<Vec>((reinterpret_cast<IVec>(a) & mask) | (reinterpret_cast<IVec>(b) & ~mask));
}

// A mask of lanes [0, n).
METAPEFT_INLINE IVec first_lanes(int64_t n) {
  IVec lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < static_cast<int32_t>(n);
}

// Lanes [0, n) of p; the others are `fill`.
METAPEFT_INLINE Vec load(const float* p, int64_t n, float fill) {
  Vec v;
  if (n >= kLanes) {
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  float tmp[kLanes];
  std::fill(tmp, tmp + kLanes, fill);
  std::copy(p, p + n, tmp);
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}

// Writes lanes [0, n) of v to p.
METAPEFT_INLINE void store(float* p, Vec v, int64_t n) {
  if (n >= kLanes) {
    std::memcpy(p, &v, sizeof(v));
    return;
  }
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(v));
  std::copy(tmp, tmp + n, p);
}

// exp(x) within 2 ulp (Cephes' polynomial on x - n ln 2); 0 below -87.33 (and
// for -inf), +inf above 88.72, NaN for NaN. Lanes below -87.33 are worked out at
// 0, not at -87.33: there the product below comes out subnormal, and a subnormal
// result costs x86 a microcode assist of about a hundred cycles per instruction
// (the softmax of a wide vocabulary has most of its lanes down there).
METAPEFT_INLINE Vec vec_exp(Vec x) {
  constexpr float lo = -87.3365447504f, hi = 88.7228391117f;
  Vec c = select(x < lo, Vec{}, x);
  c = select(c > hi, splat(hi), c);
  Vec t = c * 1.44269504088896341f + 0.5f;
  Vec n = __builtin_convertvector(__builtin_convertvector(t, IVec), Vec);
  n = select(n > t, n - 1.0f, n); // floor
  Vec r = c - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as n + 127 in the exponent bits; n = 128 (x near hi) is split in two.
  IVec k = __builtin_convertvector(n, IVec);
  IVec big = k > 127;
  IVec first = (k & ~big) | (IVec{} + 127 & big);
  Vec y = p * reinterpret_cast<Vec>((first + 127) << 23) *
      reinterpret_cast<Vec>((k - first + 127) << 23);
  y = select(x < lo, Vec{}, y);
  y = select(x > hi, splat(std::numeric_limits<float>::infinity()), y);
  return select(x != x, x, y);
}

// max over x[0..n) of scale * x; -inf for n == 0.
METAPEFT_INLINE float scaled_max(const float* x, int64_t n, float scale) {
  constexpr float ninf = -std::numeric_limits<float>::infinity();
  Vec acc = splat(ninf);
  for (int64_t j = 0; j < n; j += kLanes) {
    Vec v = load(x + j, n - j, 0.0f) * scale;
    if (n - j < kLanes) {
      v = select(first_lanes(n - j), v, splat(ninf));
    }
    acc = select(v > acc, v, acc);
  }
  float m = ninf;
  for (int l = 0; l < kLanes; ++l) {
    m = acc[l] > m ? acc[l] : m;
  }
  return m;
}

// y[j] = exp(scale * x[j] - shift) for j < n (y may be null: not stored);
// returns the sum of the exps.
METAPEFT_INLINE float exp_sum(const float* x, float* y, int64_t n, float scale, float shift) {
  Vec acc{};
  for (int64_t j = 0; j < n; j += kLanes) {
    int64_t left = n - j;
    Vec e = vec_exp(load(x + j, left, 0.0f) * scale - shift);
    if (left < kLanes) {
      e = select(first_lanes(left), e, Vec{});
    }
    if (y) {
      store(y + j, e, left);
    }
    acc += e;
  }
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    sum += acc[l];
  }
  return sum;
}

// y[j] *= s for j < n; those that would come out subnormal come out 0 instead, for
// the reason vec_exp gives.
METAPEFT_INLINE void scale_to_normal(float* y, int64_t n, float s) {
  Vec least = splat(std::numeric_limits<float>::min() / std::fabs(s));
  for (int64_t j = 0; j < n; j += kLanes) {
    int64_t left = n - j;
    Vec v = load(y + j, left, 0.0f);
    store(y + j, select(v < least, Vec{}, v) * s, left);
  }
}

// Registers a kernel's arrays with the CPU command encoder of `stream`, first
// allocating every output unless `allocate` is false (an output that took over an
// input's buffer); returns the encoder to dispatch on.
inline mx::cpu::CommandEncoder& cpu_encoder(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    bool allocate = true) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    if (allocate) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    encoder.set_output_array(out);
  }
  return encoder;
}

// The functions a fused kernel stands for, written with MLX ops: the primitives
// take their derivatives from these (second order goes through MLX's own).
using StockFn = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;

// vjp of `fn` at `primals`, the gradients of the inputs in `argnums`.
inline std::vector<mx::array> stock_vjp(
    const StockFn& fn,
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums) {
  auto grads = mx::vjp(fn, primals, cotangents).second;
  std::vector<mx::array> out;
  for (int arg : argnums) {
    out.push_back(grads[arg]);
  }
  return out;
}

// jvp of `fn` at `primals` with `tangents` for the inputs in `argnums` (zero for the others).
inline std::vector<mx::array> stock_jvp(
    const StockFn& fn,
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums,
    mx::Stream s) {
  std::vector<mx::array> t;
  for (auto& p : primals) {
    t.push_back(mx::zeros_like(p, s));
  }
  for (size_t i = 0; i < argnums.size(); ++i) {
    t[argnums[i]] = tangents[i];
  }
  return mx::jvp(fn, primals, t).second;
}

// How many chunks for_row_chunks splits `rows` rows of `row_size` elements into:
// about 16k elements each, at most 0xffff, and 1 on a single CPU.
inline int64_t row_chunk_count(int64_t rows, int64_t row_size) {
  constexpr int64_t kChunkElements = 1 << 14;
  int64_t per_chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(row_size, 1));
  int64_t chunks = std::min<int64_t>((rows + per_chunk - 1) / per_chunk, 0xffff);
  return (cpu_threads() == 1 || chunks <= 1) ? 1 : chunks;
}

// Calls f(chunk, begin, end) for the row_chunk_count() chunks covering [0, rows),
// on the calling thread and the workers.
template <typename F>
void for_row_chunks(int64_t rows, int64_t row_size, F f) {
  int64_t chunks = row_chunk_count(rows, row_size);
  if (chunks == 1) {
    f(int64_t{0}, int64_t{0}, rows);
    return;
  }
  int64_t step = (rows + chunks - 1) / chunks;
  run_chunks(static_cast<int>(chunks), [&](int c) {
    int64_t begin = c * step, end = std::min(rows, begin + step);
    if (begin < end) {
      f(int64_t{c}, begin, end);
    }
  });
}

// for_row_chunks without the chunk index: f(begin, end).
template <typename F>
void for_rows(int64_t rows, int64_t row_size, F f) {
  for_row_chunks(rows, row_size, [&](int64_t, int64_t begin, int64_t end) { f(begin, end); });
}

} // namespace metapeft
