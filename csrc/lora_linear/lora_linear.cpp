#include "lora_linear/lora_linear.h"

#include <cmath>

#include "linear/linear.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.lora_linear] " + msg);
}

std::string dim(int d) {
  return std::to_string(d);
}

} // namespace

mx::array lora_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    float scale,
    const std::optional<mx::array>& bias,
    mx::StreamOrDevice s) {
  const char* op = "lora_linear";
  check_float(x, op, "x");
  check_float(weight, op, "weight");
  check_float(lora_a, op, "lora_a");
  check_float(lora_b, op, "lora_b");
  if (!std::isfinite(scale)) {
    fail("scale must be finite, got " + std::to_string(scale));
  }
  if (lora_a.ndim() != 2 && lora_a.ndim() != 3) {
    fail("lora_a must have shape (d_in, r) or (T, d_in, r), got " + shape_str(lora_a.shape()));
  }
  bool per_task = lora_a.ndim() == 3;
  if (lora_b.ndim() != lora_a.ndim()) {
    fail(std::string("lora_b must have shape ") + (per_task ? "(T, r, d_out)" : "(r, d_out)") +
         " to match lora_a " + shape_str(lora_a.shape()) + ", got " + shape_str(lora_b.shape()));
  }
  if (weight.ndim() != 2 && !(per_task && weight.ndim() == 3)) {
    fail(std::string("weight must have shape (d_out, d_in)") +
         (per_task ? " or (T, d_out, d_in)" : "") + ", got " + shape_str(weight.shape()));
  }
  int d_out = weight.shape(-2);
  int d_in = weight.shape(-1);
  int r = lora_a.shape(-1);
  if (x.ndim() < (per_task ? 2 : 1)) {
    fail(std::string("x must have shape ") + (per_task ? "(T, ..., d_in)" : "(..., d_in)") +
         ", got " + shape_str(x.shape()));
  }
  if (x.shape(-1) != d_in) {
    fail("x has d_in=" + dim(x.shape(-1)) + " but weight " + shape_str(weight.shape()) +
         " expects d_in=" + dim(d_in));
  }
  if (lora_a.shape(-2) != d_in) {
    fail("lora_a " + shape_str(lora_a.shape()) + " has d_in=" + dim(lora_a.shape(-2)) +
         " but weight " + shape_str(weight.shape()) + " has d_in=" + dim(d_in));
  }
  if (lora_b.shape(-2) != r) {
    fail("rank mismatch: lora_a " + shape_str(lora_a.shape()) + " has r=" + dim(r) +
         " but lora_b " + shape_str(lora_b.shape()) + " has r=" + dim(lora_b.shape(-2)));
  }
  if (lora_b.shape(-1) != d_out) {
    fail("lora_b " + shape_str(lora_b.shape()) + " has d_out=" + dim(lora_b.shape(-1)) +
         " but weight " + shape_str(weight.shape()) + " has d_out=" + dim(d_out));
  }
  if (per_task) {
    int T = lora_a.shape(0);
    auto check_t = [&](const mx::array& a, const char* name) {
      if (a.shape(0) != T) {
        fail(std::string(name) + " " + shape_str(a.shape()) + " has T=" + dim(a.shape(0)) +
             " but lora_a " + shape_str(lora_a.shape()) + " has T=" + dim(T));
      }
    };
    check_t(lora_b, "lora_b");
    check_t(x, "x");
    if (weight.ndim() == 3) {
      check_t(weight, "weight");
    }
  }
  std::vector<mx::array> inputs = {x, weight, lora_a, lora_b};
  if (bias) {
    check_float(*bias, op, "bias");
    auto& b = *bias;
    bool ok = (b.ndim() == 1 && b.shape(0) == d_out) ||
        (per_task && b.ndim() == 2 && b.shape(0) == lora_a.shape(0) && b.shape(1) == d_out);
    if (!ok) {
      fail("bias must have shape (" + dim(d_out) + ",)" +
           (per_task ? " or (" + dim(lora_a.shape(0)) + ", " + dim(d_out) + ")"
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
    // MLX's own matmul kernels: the base product, then the two thin ones.
    auto low = matmul_affine(x, mx::swapaxes(lora_a, -1, -2, stream), std::nullopt, dtype, stream);
    low = matmul_affine(low, mx::swapaxes(lora_b, -1, -2, stream), std::nullopt, dtype, stream);
    auto base = matmul_affine(x, weight, bias, dtype, stream);
    return mx::add(base, mx::multiply(mx::array(scale, dtype), low, stream), stream);
  }
  return mx::array(shape, dtype, std::make_shared<LoraLinear>(stream, scale), inputs);
}

void LoraLinear::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  eval_affine_cpu(stream(), inputs, outputs[0], true, scale_);
}

void LoraLinear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.lora_linear] has no Metal kernel: on the GPU, metapeft.ops.lora_linear is "
      "MLX's matmul");
}

std::vector<mx::Shape> LoraLinear::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(-2);
  return {shape};
}

std::vector<mx::array> LoraLinear::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto& a = primals[2];
  auto& b = primals[3];
  auto& g = cotangents[0];
  auto s = stream();
  bool per_task = a.ndim() == 3;
  auto sc = mx::array(scale_, mx::float32);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    mx::array grad = g;
    if (arg == 0) {
      // dx = g @ W + scale * (g @ B^T) @ A^T: the same fused op, transposed.
      grad = lora_linear(
          g,
          mx::swapaxes(w, -1, -2, s),
          mx::swapaxes(b, -1, -2, s),
          mx::swapaxes(a, -1, -2, s),
          scale_,
          std::nullopt,
          s);
    } else if (arg == 1) {
      grad = outer_sum(g, x, w.ndim() == 3, s);
    } else if (arg == 2) {
      auto gb = linear(g, b, std::nullopt, s);
      grad = mx::multiply(sc, outer_sum(x, gb, per_task, s), s);
    } else if (arg == 3) {
      auto h = linear_plain(x, a, std::nullopt, s);
      grad = mx::multiply(sc, outer_sum(h, g, per_task, s), s);
    } else {
      grad = bias_grad(g, primals[4].ndim() == 2, s);
    }
    grads.push_back(mx::astype(grad, primals[arg].dtype(), s));
  }
  return grads;
}

std::vector<mx::array> LoraLinear::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  auto& x = primals[0];
  auto& w = primals[1];
  auto& a = primals[2];
  auto& b = primals[3];
  auto s = stream();
  auto sc = mx::array(scale_, mx::float32);
  std::optional<mx::array> out;
  auto add = [&](const mx::array& t) { out = out ? mx::add(*out, t, s) : t; };
  auto low_rank = [&](const mx::array& da, const mx::array& db) {
    return mx::multiply(sc, linear_plain(linear_plain(x, da, std::nullopt, s), db, std::nullopt, s), s);
  };
  for (size_t i = 0; i < argnums.size(); ++i) {
    auto& t = tangents[i];
    switch (argnums[i]) {
      case 0:
        add(lora_linear(t, w, a, b, scale_, std::nullopt, s));
        break;
      case 1:
        add(linear(x, t, std::nullopt, s));
        break;
      case 2:
        add(low_rank(t, b));
        break;
      case 3:
        add(low_rank(a, t));
        break;
      default:
        add(expand_bias(t, x.ndim(), s));
    }
  }
  return leaf_tangents({out}, output_shapes(primals), {result_dtype(primals)}, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> LoraLinear::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  bool per_task = inputs[2].ndim() - (axes[2] >= 0) == 3;
  bool has_bias = inputs.size() > 4;
  std::optional<mx::array> bias;
  if (has_bias) {
    bias = inputs[4];
  }
  bool params_mapped = false;
  for (size_t i = 1; i < inputs.size(); ++i) {
    params_mapped |= axes[i] >= 0;
  }
  auto& w = inputs[1];
  if (!params_mapped) {
    // Only x is mapped: the mapped axis rides along with x's batch axes.
    int to = per_task ? 1 : 0;
    auto x = mx::moveaxis(inputs[0], axes[0], to, s);
    return {{lora_linear(x, w, inputs[2], inputs[3], scale_, bias, s)}, {to}};
  }
  int V = vmap_size(inputs, axes);
  if (!per_task) {
    // V becomes the task axis; an unmapped weight or bias stays shared.
    auto front = [&](int i) { return to_front(inputs[i], axes[i], V, s); };
    auto weight = axes[1] >= 0 ? front(1) : w;
    if (has_bias && axes[4] >= 0) {
      bias = front(4);
    }
    return {{lora_linear(front(0), weight, front(2), front(3), scale_, bias, s)}, {0}};
  }
  // Fold V into the task axis: (V, T, ...) -> (V * T, ...).
  int T = inputs[2].shape(axes[2] == 0 ? 1 : 0);
  auto fold = [&](int i, bool has_task_axis) {
    return fold_tasks(inputs[i], axes[i], V, T, has_task_axis, s);
  };
  if (has_bias) {
    bias = fold(4, inputs[4].ndim() - (axes[4] >= 0) == 2);
  }
  auto out = lora_linear(
      fold(0, true),
      fold(1, w.ndim() - (axes[1] >= 0) == 3),
      fold(2, true),
      fold(3, true),
      scale_,
      bias,
      s);
  return {{unfold_tasks(out, V, s)}, {0}};
}

} // namespace metapeft
