#include "linear_cross_entropy/linear_cross_entropy.h"

#include <cmath>
#include <memory>

#include "blas.h"
#include "cross_entropy/cross_entropy.h"
#include "linear/linear.h"
#include "rows.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.linear_cross_entropy] " + msg);
}

// Each block of logits holds at most this many (16 MB in float32).
constexpr int64_t kBlockLogits = 1 << 22;
// A block is at least this many vocabulary columns wide (when it has many rows).
constexpr int64_t kMinColumns = 1024;

// The running state of one row over the vocabulary blocks seen so far: their
// largest logit, the sum of their exp(logit - max), and the target's logit.
struct RowState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;
  float picked = 0.0f;
};

// Per row of `logits` (a block of rows, `n` columns from vocabulary column v0):
// folds the block into the row's state and turns it into exp(logit - new max);
// the row's gradient so far, `grad` (d wide), is rescaled to that max.
METAPEFT_SIMD_CLONES
void fold_rows(
    float* logits,
    const int32_t* t,
    RowState* state,
    float* grad,
    int64_t begin,
    int64_t end,
    int64_t n,
    int64_t v0,
    int64_t d) {
  for (int64_t r = begin; r < end; ++r) {
    float* lr = logits + r * n;
    RowState& st = state[r];
    if (t[r] >= v0 && t[r] < v0 + n) {
      st.picked = lr[t[r] - v0];
    }
    float m = std::max(st.max, scaled_max(lr, n, 1.0f));
    if (m != st.max && st.sum != 0.0f) {
      float factor = std::exp(st.max - m);
      st.sum *= factor;
      float* gr = grad + r * d;
      for (int64_t j = 0; j < d; ++j) {
        gr[j] *= factor;
      }
    }
    st.max = m;
    st.sum += exp_sum(lr, lr, n, 1.0f, m);
  }
}

// The two outputs {loss, row_grads} as metapeft's other ops compute them, from one
// product of logits: what the derivatives other than row_grads' first-order one are
// taken from, and the outputs for a weight with a leading task axis (T, V, d).
std::vector<mx::array> composed(const mx::array& x, const mx::array& w, const mx::array& t, mx::Stream s) {
  auto logits = linear(x, w, std::nullopt, s);
  auto grad = cross_entropy_grad(logits, t, mx::ones(t.shape(), mx::float32, s), s);
  return {cross_entropy(logits, t, s), linear_plain(mx::astype(grad, mx::float32, s), w, std::nullopt, s)};
}

// The outputs {loss, row_grads} for any x, weight and targets; a weight with a
// leading task axis, paired with x (T, ..., d) under vmap, takes the composed form.
std::vector<mx::array> outputs_of(const mx::array& x, const mx::array& w, const mx::array& t, mx::Stream s) {
  if (w.ndim() == 3) {
    return composed(x, w, t, s);
  }
  auto rows_shape = x.shape();
  rows_shape.pop_back();
  return mx::array::make_arrays(
      {rows_shape, x.shape()},
      {mx::float32, mx::float32},
      std::make_shared<LinearCrossEntropy>(s),
      {x, w, t});
}

} // namespace

mx::array linear_cross_entropy(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& targets,
    mx::StreamOrDevice s) {
  check_float(x, "linear_cross_entropy", "x");
  check_float(weight, "linear_cross_entropy", "weight");
  if (weight.ndim() != 2 || weight.shape(0) < 1) {
    fail("weight must have shape (V, d) with V >= 1, got " + shape_str(weight.shape()));
  }
  if (x.ndim() < 1 || x.shape(-1) != weight.shape(1)) {
    fail("x must have shape (..., " + std::to_string(weight.shape(1)) + ") for weight " +
         shape_str(weight.shape()) + ", got " + shape_str(x.shape()));
  }
  auto stream = mx::to_stream(s);
  auto t = target_indices(targets, x, "linear_cross_entropy", "x", stream);
  if (stream.device == mx::Device::gpu) {
    auto logits = mx::matmul(mx::astype(x, mx::float32, stream),
                             mx::transpose(mx::astype(weight, mx::float32, stream), stream),
                             stream);
    return cross_entropy(logits, t, stream);
  }
  return outputs_of(x, weight, t, stream)[0];
}

void LinearCrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& encoder = cpu_encoder(stream(), inputs, outputs);
  int64_t rows = outputs[0].size();
  int64_t d = inputs[0].shape(-1);
  int64_t V = inputs[1].shape(0);
  if (rows == 0) {
    return;
  }
  // Blocks of vocabulary columns, each taking every row (up to kBlockLogits /
  // kMinColumns rows at a time): the weight is read, and packed by the BLAS, once,
  // where blocks of rows would each read it whole. As in an online softmax, each
  // row's max and sum carry from block to block, and row_grads gathers
  // exp(logits - max) @ weight, rescaled when a row's max grows.
  encoder.dispatch([xo = operand(inputs[0]),
                    wo = operand(inputs[1]),
                    to = operand(inputs[2]),
                    loss = outputs[0].data<float>(),
                    row_grads = outputs[1].data<float>(),
                    rows,
                    d,
                    V]() {
    std::vector<float> sx, sw;
    const float* xp = dense_float(xo, sx);
    Mat w = as_mat(wo, false, sw);
    auto tp = static_cast<const int32_t*>(to.ptr);
    // The weight's rows from v0 on (the logits' columns from v0 on), and the step
    // between the elements of one weight row.
    auto weight_rows = [&](int64_t v0) { return w.data + (w.trans ? v0 : v0 * w.ld); };
    int64_t stride = w.trans ? w.ld : 1;
    int64_t most_rows = std::min(rows, std::max<int64_t>(1, kBlockLogits / kMinColumns));
    int64_t cols = std::clamp<int64_t>(kBlockLogits / most_rows, 1, V);
    std::unique_ptr<float[]> logits(new float[most_rows * cols]);
    std::vector<RowState> state(most_rows);
    for (int64_t b = 0; b < rows; b += most_rows) {
      int64_t n_rows = std::min(most_rows, rows - b);
      float* grad = row_grads + b * d;
      std::fill(grad, grad + n_rows * d, 0.0f);
      std::fill(state.begin(), state.end(), RowState{});
      for (int64_t v0 = 0; v0 < V; v0 += cols) {
        int64_t n = std::min(cols, V - v0);
        if (d > 0) {
          blas::sgemm_shared(false, !w.trans, n_rows, n, d, 1.0f, xp + b * d, d,
                             weight_rows(v0), w.ld, 0.0f, logits.get(), n);
        } else {
          std::fill(logits.get(), logits.get() + n_rows * n, 0.0f);
        }
        for_rows(n_rows, n, [&](int64_t begin, int64_t end) {
          fold_rows(logits.get(), tp + b, state.data(), grad, begin, end, n, v0, d);
        });
        if (d > 0) {
          blas::sgemm_shared(false, w.trans, n_rows, d, n, 1.0f, logits.get(), n,
                             weight_rows(v0), w.ld, 1.0f, grad, d);
        }
      }
      // loss = logsumexp - the target's logit; row_grads = (softmax - onehot) @ weight.
      for (int64_t r = 0; r < n_rows; ++r) {
        const RowState& st = state[r];
        int32_t target = tp[b + r];
        bool ok = target >= 0 && target < V;
        loss[b + r] = ok ? st.max + std::log(st.sum) - st.picked
                         : std::numeric_limits<float>::quiet_NaN();
        float inv = 1.0f / st.sum;
        float* gr = grad + r * d;
        const float* wt = ok ? weight_rows(target) : nullptr;
        for (int64_t j = 0; j < d; ++j) {
          gr[j] = gr[j] * inv - (ok ? wt[j * stride] : 0.0f);
        }
      }
    }
  });
}

void LinearCrossEntropy::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.linear_cross_entropy] has no Metal kernel: on the GPU, "
      "metapeft.ops.linear_cross_entropy is MLX's own ops");
}

std::vector<mx::Shape> LinearCrossEntropy::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.pop_back();
  return {shape, inputs[0].shape()};
}

std::vector<mx::array> LinearCrossEntropy::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  auto& x = primals[0];
  auto t = primals[2];
  // MLX passes zeros for an output nothing depended on: row_grads, except in
  // second order; the loss, in second order. Their terms are skipped.
  bool loss_used = !is_zero_fill(cotangents[0]);
  bool row_grads_used = !is_zero_fill(cotangents[1]);
  std::vector<mx::array> through_row_grads;
  if (row_grads_used) {
    auto fn = [t, s](const std::vector<mx::array>& in) {
      return std::vector<mx::array>{composed(in[0], in[1], t, s)[1]};
    };
    through_row_grads = mx::vjp(fn, {x, primals[1]}, {cotangents[1]}).second;
  }
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 2) {
      grads.push_back(mx::zeros_like(t, s));
      continue;
    }
    std::optional<mx::array> g;
    auto add = [&](const mx::array& a) { g = g ? mx::add(*g, a, s) : a; };
    if (loss_used && arg == 0) {
      add(mx::multiply(mx::expand_dims(cotangents[0], -1, s), outputs[1], s));
    } else if (loss_used) {
      auto fn = [x, t, s](const std::vector<mx::array>& in) {
        return std::vector<mx::array>{composed(x, in[0], t, s)[0]};
      };
      add(mx::vjp(fn, {primals[1]}, {cotangents[0]}).second[0]);
    }
    if (row_grads_used) {
      add(through_row_grads[arg]);
    }
    auto& p = primals[arg];
    grads.push_back(g ? mx::astype(*g, p.dtype(), s) : mx::zeros_like(p, s));
  }
  return grads;
}

std::vector<mx::array> LinearCrossEntropy::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto s = stream();
  auto t = primals[2];
  auto fn = [t, s](const std::vector<mx::array>& in) { return composed(in[0], in[1], t, s); };
  std::vector<int> float_args;
  std::vector<mx::array> float_tangents;
  for (size_t i = 0; i < argnums.size(); ++i) {
    if (argnums[i] != 2) {
      float_args.push_back(argnums[i]);
      float_tangents.push_back(tangents[i]);
    }
  }
  return stock_jvp(fn, {primals[0], primals[1]}, float_tangents, float_args, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearCrossEntropy::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  int V = vmap_size(inputs, axes);
  auto x = to_front(inputs[0], axes[0], V, s);
  auto t = mx::contiguous(to_front(inputs[2], axes[2], V, s), false, s);
  // An unmapped weight is shared: the mapped axis rides along with x's rows.
  auto w = axes[1] >= 0 ? mx::moveaxis(inputs[1], axes[1], 0, s) : inputs[1];
  return {outputs_of(x, w, t, s), {0, 0}};
}

} // namespace metapeft
