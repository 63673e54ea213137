#include "linear/linear.h"

#include <algorithm>
#include <sstream>

#include "blas.h"
#include "mlx/backend/cpu/encoder.h"
#include "workers.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.linear] " + msg);
}

} // namespace

mx::array linear(
    const mx::array& x,
    const mx::array& weight,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  check_float(x, "linear", "x");
  check_float(weight, "linear", "weight");
  if (weight.ndim() != 2 && weight.ndim() != 3) {
    fail("weight must have shape (d_out, d_in) or (T, d_out, d_in), got " +
         shape_str(weight.shape()));
  }
  bool per_task = weight.ndim() == 3;
  int d_out = weight.shape(-2);
  int d_in = weight.shape(-1);
  if (x.ndim() < (per_task ? 2 : 1)) {
    fail(std::string("x must have shape ") + (per_task ? "(T, ..., d_in)" : "(..., d_in)") +
         ", got " + shape_str(x.shape()));
  }
  if (x.shape(-1) != d_in) {
    fail("x has d_in=" + std::to_string(x.shape(-1)) + " but weight " +
         shape_str(weight.shape()) + " expects d_in=" + std::to_string(d_in));
  }
  if (per_task && x.shape(0) != weight.shape(0)) {
    fail("x has T=" + std::to_string(x.shape(0)) + " tasks but weight " +
         shape_str(weight.shape()) + " has T=" + std::to_string(weight.shape(0)));
  }
  std::vector<mx::array> inputs = {x, weight};
  if (bias) {
    check_float(*bias, "linear", "bias");
    auto& b = *bias;
    bool ok = (b.ndim() == 1 && b.shape(0) == d_out) ||
        (per_task && b.ndim() == 2 && b.shape(0) == weight.shape(0) && b.shape(1) == d_out);
    if (!ok) {
      fail("bias must have shape (" + std::to_string(d_out) + ",)" +
           (per_task ? " or (" + std::to_string(weight.shape(0)) + ", " +
                    std::to_string(d_out) + ")"
                     : std::string()) +
           ", got " + shape_str(b.shape()));
    }
    inputs.push_back(b);
  }
  auto shape = x.shape();
  shape.back() = d_out;
  auto dtype = result_dtype(inputs);
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    return matmul_affine(x, weight, bias, dtype, stream);
  }
  return mx::array(shape, dtype, std::make_shared<Linear>(stream), inputs);
}

mx::array matmul_affine(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& bias,
    mx::Dtype dtype,
    mx::Stream s) {
  auto wt = mx::swapaxes(mx::astype(w, dtype, s), -1, -2, s);
  auto xd = mx::astype(x, dtype, s);
  auto out_shape = x.shape();
  out_shape.back() = w.shape(-2);
  mx::array out = w.ndim() == 3
      // One product per task: x's middle axes flattened into rows.
      ? mx::reshape(
            mx::matmul(
                mx::reshape(xd, {x.shape(0), static_cast<int>(prod(x.shape(), 1, x.ndim() - 1)), x.shape(-1)}, s),
                wt,
                s),
            out_shape,
            s)
      : mx::matmul(xd, wt, s);
  if (bias) {
    out = mx::add(out, expand_bias(mx::astype(*bias, dtype, s), out.ndim(), s), s);
  }
  return out;
}

namespace {

// Below this many multiply-adds in all, per-task products stay on one thread:
// waking a worker costs tens of microseconds.
constexpr double kTaskParallelMacs = 1 << 22;

// Calls f(0), ..., f(B - 1), one product of `macs` multiply-adds per task.
// Products too small for OpenBLAS's own threads run one per thread, shared
// among the workers, when together they are worth waking them for.
template <typename F>
void for_tasks(int64_t B, double macs, F f) {
  bool small = macs < blas::kParallelMacs || blas::sequential();
  if (B > 1 && B <= 0xffff && small && B * macs >= kTaskParallelMacs) {
    run_chunks(static_cast<int>(B), [&](int t) { f(t); });
    return;
  }
  for (int64_t t = 0; t < B; ++t) {
    f(t);
  }
}

// out (B, M, N) = x (B, M, K) @ w^T + bias, all float32. A batch stride of 0
// shares an operand across the batch; `bias` is (B, N) with stride `bias_stride`
// (0: one bias for all), or null.
void affine(
    const Mat& x,
    const Mat& w,
    const float* bias,
    int64_t bias_stride,
    int64_t B,
    int64_t M,
    int64_t N,
    int64_t K,
    float* out) {
  if (B == 0 || M == 0 || N == 0) {
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    float* o = out + b * M * N;
    if (bias) {
      const float* bb = bias + b * bias_stride;
      for (int64_t m = 0; m < M; ++m) {
        std::copy(bb, bb + N, o + m * N);
      }
    } else if (K == 0) {
      std::fill(o, o + M * N, 0.0f);
    }
  }
  if (K == 0) {
    return;
  }
  float beta = bias ? 1.0f : 0.0f;
  // One product over all B * M rows when the weight is shared and the rows of
  // x are evenly spaced across the batch.
  bool shared_w = B == 1 || w.batch_stride == 0;
  if (shared_w && !x.trans && (B == 1 || x.batch_stride == M * x.ld)) {
    blas::sgemm_shared(false, !w.trans, B * M, N, K, 1.0f, x.data, x.ld, w.data, w.ld, beta, out, N);
    return;
  }
  for_tasks(B, static_cast<double>(M) * N * K, [&](int64_t b) {
    blas::sgemm(
        x.trans, !w.trans, M, N, K, 1.0f, x.at(b), x.ld, w.at(b), w.ld, beta, out + b * M * N, N);
  });
}

} // namespace

void eval_affine_cpu(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    mx::array& out,
    bool lora,
    float scale) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);

  bool per_task = lora ? inputs[2].ndim() == 3 : inputs[1].ndim() == 3;
  auto& xs = inputs[0].shape();
  int nd = xs.size();
  int64_t B = per_task ? xs[0] : 1;
  int64_t M = prod(xs, per_task ? 1 : 0, nd - 1);
  int64_t K = xs[nd - 1];
  int64_t N = inputs[1].shape(-2);
  size_t n_args = lora ? 4 : 2;
  std::optional<Operand> bias, lora_a, lora_b;
  if (inputs.size() > n_args) {
    bias = operand(inputs[n_args]);
  }
  if (lora) {
    lora_a = operand(inputs[2]);
    lora_b = operand(inputs[3]);
  }
  encoder.dispatch([x = operand(inputs[0]),
                    w = operand(inputs[1]),
                    lora_a,
                    lora_b,
                    bias,
                    per_task,
                    B,
                    M,
                    N,
                    K,
                    scale,
                    out_ptr = out.data<void>(),
                    out_dtype = out.dtype()]() {
    std::vector<float> sx, sw, sbias, so;
    Mat xm = as_mat(x, per_task, sx);
    Mat wm = as_mat(w, w.shape.size() == 3, sw);
    const float* bp = nullptr;
    int64_t b_stride = 0;
    if (bias) {
      bp = dense_float(*bias, sbias);
      b_stride = bias->shape.size() == 2 ? N : 0;
    }
    float* dst = float_output(out_ptr, out_dtype, B * M * N, so);
    affine(xm, wm, bp, b_stride, B, M, N, K, dst);
    int64_t R = lora_a ? lora_a->shape.back() : 0;
    if (R > 0 && K > 0 && M > 0 && N > 0) {
      std::vector<float> sa, sb;
      Mat am = as_mat(*lora_a, per_task, sa);
      Mat bm = as_mat(*lora_b, per_task, sb);
      // h = x @ A stays float32 (A^T is A with its layout flipped); then
      // out += scale * h @ B, one thin product per task.
      std::vector<float> h(B * M * R);
      Mat at = {am.data, am.batch_stride, am.ld, !am.trans};
      affine(xm, at, nullptr, 0, B, M, R, K, h.data());
      for_tasks(B, static_cast<double>(M) * N * R, [&](int64_t t) {
        blas::sgemm(false, bm.trans, M, N, R, scale, h.data() + t * M * R, R, bm.at(t), bm.ld,
                    1.0f, dst + t * M * N, N);
      });
    }
    store_float_output(so, out_ptr, out_dtype);
  });
}

void Linear::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  eval_affine_cpu(stream(), inputs, outputs[0], false, 0.0f);
}

void Linear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.linear] has no Metal kernel: on the GPU, metapeft.ops.linear is MLX's matmul");
}

std::vector<mx::Shape> Linear::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(-2);
  return {shape};
}

mx::array outer_sum(
    const mx::array& a,
    const mx::array& b,
    bool per_task,
    mx::StreamOrDevice s) {
  int nd = a.ndim();
  int m = a.shape(-1), n = b.shape(-1);
  if (per_task) {
    int T = a.shape(0);
    int rows = prod(a.shape(), 1, nd - 1);
    auto a3 = mx::reshape(a, {T, rows, m}, s);
    auto b3 = mx::reshape(b, {T, rows, n}, s);
    return linear(mx::swapaxes(a3, 1, 2, s), mx::swapaxes(b3, 1, 2, s), std::nullopt, s);
  }
  int rows = prod(a.shape(), 0, nd - 1);
  auto a2 = mx::reshape(a, {rows, m}, s);
  auto b2 = mx::reshape(b, {rows, n}, s);
  return linear(mx::transpose(a2, s), mx::transpose(b2, s), std::nullopt, s);
}

mx::array bias_grad(const mx::array& g, bool per_task, mx::StreamOrDevice s) {
  std::vector<int> axes;
  for (int ax = per_task ? 1 : 0; ax < static_cast<int>(g.ndim()) - 1; ++ax) {
    axes.push_back(ax);
  }
  return axes.empty() ? g : sum_axes(g, axes, false, s);
}

mx::array expand_bias(const mx::array& bias, int ndim, mx::StreamOrDevice s) {
  if (bias.ndim() != 2) {
    return bias;
  }
  mx::Shape shape(ndim, 1);
  shape.front() = bias.shape(0);
  shape.back() = bias.shape(1);
  return mx::reshape(bias, shape, s);
}

std::vector<mx::array> Linear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto& g = cotangents[0];
  auto s = stream();
  bool per_task = w.ndim() == 3;
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(mx::astype(linear(g, mx::swapaxes(w, -1, -2, s), std::nullopt, s),
                                 x.dtype(), s));
    } else if (arg == 1) {
      grads.push_back(mx::astype(outer_sum(g, x, per_task, s), w.dtype(), s));
    } else {
      auto& b = primals[2];
      grads.push_back(mx::astype(bias_grad(g, b.ndim() == 2, s), b.dtype(), s));
    }
  }
  return grads;
}

std::vector<mx::array> Linear::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto s = stream();
  std::optional<mx::array> out;
  auto add = [&](const mx::array& t) { out = out ? mx::add(*out, t, s) : t; };
  for (size_t i = 0; i < argnums.size(); ++i) {
    auto& t = tangents[i];
    if (argnums[i] == 0) {
      add(linear(t, w, std::nullopt, s));
    } else if (argnums[i] == 1) {
      add(linear(x, t, std::nullopt, s));
    } else {
      add(expand_bias(t, x.ndim(), s));
    }
  }
  return leaf_tangents({out}, output_shapes(primals), {result_dtype(primals)}, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> Linear::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  bool per_task = inputs[1].ndim() - (axes[1] >= 0) == 3;
  bool has_bias = inputs.size() > 2;
  bool params_mapped = axes[1] >= 0 || (has_bias && axes[2] >= 0);
  std::optional<mx::array> bias;
  if (!params_mapped) {
    // Only x is mapped: the mapped axis rides along with x's batch axes.
    if (has_bias) {
      bias = inputs[2];
    }
    if (!per_task) {
      return {{linear(mx::moveaxis(inputs[0], axes[0], 0, s), inputs[1], bias, s)}, {0}};
    }
    return {{linear(mx::moveaxis(inputs[0], axes[0], 1, s), inputs[1], bias, s)}, {1}};
  }
  int V = vmap_size(inputs, axes);
  if (!per_task) {
    // V becomes the task axis.
    if (has_bias) {
      bias = axes[2] >= 0 ? mx::moveaxis(inputs[2], axes[2], 0, s) : inputs[2];
    }
    auto x = to_front(inputs[0], axes[0], V, s);
    return {{linear(x, to_front(inputs[1], axes[1], V, s), bias, s)}, {0}};
  }
  // Fold V into the task axis: (V, T, ...) -> (V * T, ...).
  int T = inputs[1].shape(axes[1] == 0 ? 1 : 0);
  if (has_bias) {
    bool mapped = axes[2] >= 0;
    bias = fold_tasks(inputs[2], axes[2], V, T, inputs[2].ndim() - mapped == 2, s);
  }
  auto out = linear(
      fold_tasks(inputs[0], axes[0], V, T, true, s),
      fold_tasks(inputs[1], axes[1], V, T, true, s),
      bias,
      s);
  return {{unfold_tasks(out, V, s)}, {0}};
}

} // namespace metapeft
