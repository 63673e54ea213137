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

// A bias as affine() reads it: its float32 data (or null) and the stride between
// tasks (0: one bias for all).
std::pair<const float*, int64_t> bias_rows(
    const std::optional<Operand>& bias,
    int64_t N,
    std::vector<float>& scratch) {
  if (!bias) {
    return {nullptr, 0};
  }
  return {dense_float(*bias, scratch), bias->shape.size() == 2 ? N : 0};
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
    auto [bp, b_stride] = bias_rows(bias, N, sbias);
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

namespace {

// The same matrix read the other way round.
Mat flipped(const Mat& m) {
  return {m.data, m.batch_stride, m.ld, !m.trans};
}

// x @ w (+ bias) (Plain), or the sum over rows of a^T @ b (Outer, OuterPerTask),
// with the sums of a's rows as a second output when `row_sums`.
void eval_product_cpu(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    Linear::Form form) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
  }
  bool plain = form == Linear::Form::Plain;
  bool batched = plain ? inputs[1].ndim() == 3 : form == Linear::Form::OuterPerTask;
  auto& shape = inputs[0].shape();
  int nd = shape.size();
  int64_t B = batched ? shape[0] : 1;
  int64_t rows = prod(shape, batched ? 1 : 0, nd - 1);
  int64_t cols = shape[nd - 1];
  int64_t M = plain ? rows : cols;
  int64_t N = inputs[1].shape(-1);
  int64_t K = plain ? cols : rows;
  std::optional<Operand> bias;
  if (plain && inputs.size() > 2) {
    bias = operand(inputs[2]);
  }
  bool sums = outputs.size() > 1;
  encoder.dispatch([a = operand(inputs[0]),
                    b = operand(inputs[1]),
                    bias,
                    plain,
                    batched,
                    sums,
                    B,
                    M,
                    N,
                    K,
                    out_ptr = outputs[0].data<void>(),
                    sums_ptr = sums ? outputs[1].data<void>() : nullptr,
                    out_dtype = outputs[0].dtype()]() {
    std::vector<float> sa, sb, sbias, so, ss;
    Mat am = as_mat(a, batched, sa);
    Mat bm = as_mat(b, batched, sb);
    auto [bp, b_stride] = bias_rows(bias, N, sbias);
    float* dst = float_output(out_ptr, out_dtype, B * M * N, so);
    // affine() multiplies by its second operand transposed: flip b to take it
    // as stored, and flip a to sum its rows.
    affine(plain ? am : flipped(am), flipped(bm), bp, b_stride, B, M, N, K, dst);
    store_float_output(so, out_ptr, out_dtype);
    if (sums) {
      // a is K rows of M values per task: element (k, m) at k * ld + m, or at
      // k + m * ld when stored transposed.
      float* s = float_output(sums_ptr, out_dtype, B * M, ss);
      for (int64_t t = 0; t < B; ++t) {
        const float* at = am.at(t);
        float* st = s + t * M;
        std::fill(st, st + M, 0.0f);
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t m = 0; m < M; ++m) {
            st[m] += am.trans ? at[k + m * am.ld] : at[k * am.ld + m];
          }
        }
      }
      store_float_output(ss, sums_ptr, out_dtype);
    }
  });
}

} // namespace

void Linear::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  if (form_ == Form::Affine) {
    eval_affine_cpu(stream(), inputs, outputs[0], false, 0.0f);
  } else {
    eval_product_cpu(stream(), inputs, outputs, form_);
  }
}

void Linear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.linear] has no Metal kernel: on the GPU, metapeft.ops.linear is MLX's matmul");
}

std::vector<mx::Shape> Linear::output_shapes(const std::vector<mx::array>& inputs) {
  auto& a = inputs[0];
  auto& b = inputs[1];
  if (!outer()) {
    auto shape = a.shape();
    shape.back() = b.shape(form_ == Form::Affine ? -2 : -1);
    return {shape};
  }
  mx::Shape product = {a.shape(-1), b.shape(-1)};
  mx::Shape sums = {a.shape(-1)};
  if (form_ == Form::OuterPerTask) {
    product.insert(product.begin(), a.shape(0));
    sums.insert(sums.begin(), a.shape(0));
  }
  if (row_sums_) {
    return {product, sums};
  }
  return {product};
}

mx::array linear_plain(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs = {x, w};
  if (bias) {
    inputs.push_back(*bias);
  }
  auto dtype = result_dtype(inputs);
  if (stream.device == mx::Device::gpu) {
    return matmul_affine(x, mx::swapaxes(w, -1, -2, stream), bias, dtype, stream);
  }
  auto shape = x.shape();
  shape.back() = w.shape(-1);
  return mx::array(shape, dtype, std::make_shared<Linear>(stream, Linear::Form::Plain), inputs);
}

namespace {

// The outer-product primitive's outputs: {a^T b} or, with `row_sums`, {a^T b, the
// sums of a's rows}, shaped as Linear::output_shapes says.
std::vector<mx::array> outer_arrays(
    const mx::array& a,
    const mx::array& b,
    bool per_task,
    bool row_sums,
    mx::Stream stream) {
  auto form = per_task ? Linear::Form::OuterPerTask : Linear::Form::Outer;
  auto primitive = std::make_shared<Linear>(stream, form, row_sums);
  auto shapes = primitive->output_shapes({a, b});
  std::vector<mx::Dtype> dtypes(shapes.size(), result_dtype({a, b}));
  return mx::array::make_arrays(shapes, dtypes, primitive, {a, b});
}

} // namespace

mx::array outer_sum(
    const mx::array& a,
    const mx::array& b,
    bool per_task,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    // MLX's matmul of the transposed rows: (T, rows, m) and (T, rows, n), or no T.
    int nd = a.ndim();
    int rows = prod(a.shape(), per_task ? 1 : 0, nd - 1);
    mx::Shape a_shape = {rows, a.shape(-1)}, b_shape = {rows, b.shape(-1)};
    if (per_task) {
      a_shape.insert(a_shape.begin(), a.shape(0));
      b_shape.insert(b_shape.begin(), a.shape(0));
    }
    auto at = mx::swapaxes(mx::reshape(a, a_shape, stream), -1, -2, stream);
    auto bt = mx::swapaxes(mx::reshape(b, b_shape, stream), -1, -2, stream);
    return matmul_affine(at, bt, std::nullopt, result_dtype({a, b}), stream);
  }
  return outer_arrays(a, b, per_task, false, stream)[0];
}

std::vector<mx::array> outer_sum_and_rows(
    const mx::array& a,
    const mx::array& b,
    bool per_task,
    mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device == mx::Device::gpu) {
    return {outer_sum(a, b, per_task, stream), bias_grad(a, per_task, stream)};
  }
  return outer_arrays(a, b, per_task, true, stream);
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
  auto& a = primals[0];
  auto& b = primals[1];
  auto& g = cotangents[0];
  auto s = stream();
  auto wants = [&](int arg) { return std::find(argnums.begin(), argnums.end(), arg) != argnums.end(); };
  bool per_task = form_ == Form::OuterPerTask || (!outer() && b.ndim() == 3);
  std::optional<mx::array> fused_weight_grad, fused_bias_grad;
  if (form_ == Form::Affine && wants(1) && wants(2) && (primals[2].ndim() == 2) == per_task) {
    // The weight and bias gradients from one node.
    auto both = outer_sum_and_rows(g, a, per_task, s);
    fused_weight_grad = both[0];
    fused_bias_grad = both[1];
  }
  // The cotangent of an outer product's row sums enters as the bias of da.
  std::optional<mx::array> sums_cot;
  if (row_sums_ && !is_zero_fill(cotangents[1])) {
    sums_cot = cotangents[1];
  }
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    std::optional<mx::array> grad;
    switch (form_) {
      case Form::Affine: // a @ b^T + bias
        if (arg == 0) {
          grad = linear_plain(g, b, std::nullopt, s);
        } else if (arg == 1) {
          grad = fused_weight_grad ? *fused_weight_grad : outer_sum(g, a, per_task, s);
        } else {
          grad = fused_bias_grad ? *fused_bias_grad : bias_grad(g, primals[2].ndim() == 2, s);
        }
        break;
      case Form::Plain: // a @ b + bias
        if (arg == 0) {
          grad = linear(g, b, std::nullopt, s);
        } else if (arg == 1) {
          grad = outer_sum(a, g, per_task, s);
        } else {
          grad = bias_grad(g, primals[2].ndim() == 2, s);
        }
        break;
      case Form::Outer: // a^T @ b, summed over rows (and a's rows summed)
      case Form::OuterPerTask:
        grad = arg == 0 ? linear(b, g, sums_cot, s) : linear_plain(a, g, std::nullopt, s);
        break;
    }
    grads.push_back(mx::astype(*grad, primals[arg].dtype(), s));
  }
  return grads;
}

std::vector<mx::array> Linear::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto& a = primals[0];
  auto& b = primals[1];
  auto s = stream();
  bool per_task = form_ == Form::OuterPerTask;
  // Each form is linear in each of its inputs: its tangent is the same product
  // with that input replaced by its tangent.
  auto product = [&](const mx::array& x, const mx::array& y) {
    switch (form_) {
      case Form::Affine:
        return linear(x, y, std::nullopt, s);
      case Form::Plain:
        return linear_plain(x, y, std::nullopt, s);
      default:
        return outer_sum(x, y, per_task, s);
    }
  };
  std::optional<mx::array> out, sums;
  auto add = [&](const mx::array& t) { out = out ? mx::add(*out, t, s) : t; };
  for (size_t i = 0; i < argnums.size(); ++i) {
    auto& t = tangents[i];
    if (argnums[i] == 0) {
      add(product(t, b));
      if (row_sums_) {
        sums = bias_grad(t, per_task, s);
      }
    } else if (argnums[i] == 1) {
      add(product(a, t));
    } else {
      add(expand_bias(t, a.ndim(), s));
    }
  }
  auto dtype = result_dtype(primals);
  if (row_sums_) {
    return leaf_tangents({out, sums}, output_shapes(primals), {dtype, dtype}, s);
  }
  return leaf_tangents({out}, output_shapes(primals), {dtype}, s);
}

namespace {

// vmap of x @ w^T + bias (`plain` false) or of x @ w + bias (`plain` true).
std::pair<std::vector<mx::array>, std::vector<int>> vmap_product(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes,
    bool plain,
    mx::Stream s) {
  auto product = [&](const mx::array& x, const mx::array& w, const std::optional<mx::array>& bias) {
    return plain ? linear_plain(x, w, bias, s) : linear(x, w, bias, s);
  };
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
      return {{product(mx::moveaxis(inputs[0], axes[0], 0, s), inputs[1], bias)}, {0}};
    }
    return {{product(mx::moveaxis(inputs[0], axes[0], 1, s), inputs[1], bias)}, {1}};
  }
  int V = vmap_size(inputs, axes);
  if (!per_task) {
    // V becomes the task axis.
    if (has_bias) {
      bias = axes[2] >= 0 ? mx::moveaxis(inputs[2], axes[2], 0, s) : inputs[2];
    }
    auto x = to_front(inputs[0], axes[0], V, s);
    return {{product(x, to_front(inputs[1], axes[1], V, s), bias)}, {0}};
  }
  // Fold V into the task axis: (V, T, ...) -> (V * T, ...).
  int T = inputs[1].shape(axes[1] == 0 ? 1 : 0);
  if (has_bias) {
    bool mapped = axes[2] >= 0;
    bias = fold_tasks(inputs[2], axes[2], V, T, inputs[2].ndim() - mapped == 2, s);
  }
  auto out = product(
      fold_tasks(inputs[0], axes[0], V, T, true, s),
      fold_tasks(inputs[1], axes[1], V, T, true, s),
      bias);
  return {{unfold_tasks(out, V, s)}, {0}};
}

} // namespace

std::pair<std::vector<mx::array>, std::vector<int>> Linear::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  if (form_ == Form::Affine || form_ == Form::Plain) {
    return vmap_product(inputs, axes, form_ == Form::Plain, s);
  }
  // Outer: the mapped axis becomes the task axis, or is folded into it.
  int V = vmap_size(inputs, axes);
  auto a = to_front(inputs[0], axes[0], V, s);
  auto b = to_front(inputs[1], axes[1], V, s);
  auto outer = [&](const mx::array& x, const mx::array& y) {
    return row_sums_ ? outer_sum_and_rows(x, y, true, s)
                     : std::vector<mx::array>{outer_sum(x, y, true, s)};
  };
  if (form_ == Form::Outer) {
    auto outs = outer(a, b);
    return {outs, std::vector<int>(outs.size(), 0)};
  }
  auto fold = [&](const mx::array& z) {
    auto shape = z.shape();
    shape.erase(shape.begin());
    shape[0] *= V;
    return mx::reshape(z, shape, s);
  };
  auto outs = outer(fold(a), fold(b));
  for (auto& out : outs) {
    out = unfold_tasks(out, V, s);
  }
  return {outs, std::vector<int>(outs.size(), 0)};
}

} // namespace metapeft
