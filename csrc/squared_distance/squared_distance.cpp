#include "squared_distance/squared_distance.h"

#include "mlx/backend/cpu/encoder.h"

namespace metapeft {

namespace {

[[noreturn]] void fail_leaf(const std::string& msg, size_t leaf) {
  throw LeafError("[metapeft.squared_distance] " + msg, leaf);
}

// True when b_i is shared by the tasks of a per-task a_i (it has no task axis).
bool shared(const mx::array& a, const mx::array& b) {
  return b.ndim() + 1 == a.ndim();
}

// The axes of `a` summed into one value (all, or all but the task axis).
std::vector<int> summed_axes(const mx::array& a, bool per_task) {
  std::vector<int> axes;
  for (int ax = per_task ? 1 : 0; ax < static_cast<int>(a.ndim()); ++ax) {
    axes.push_back(ax);
  }
  return axes;
}

// The same value with MLX's own ops (the GPU's path).
mx::array composed(
    const std::vector<mx::array>& a,
    const std::vector<mx::array>& b,
    bool per_task,
    mx::Stream s) {
  auto total = per_task ? mx::zeros({a[0].shape(0)}, mx::float32, s) : mx::array(0.0f);
  for (size_t i = 0; i < a.size(); ++i) {
    auto d = mx::subtract(mx::astype(a[i], mx::float32, s), mx::astype(b[i], mx::float32, s), s);
    total = mx::add(total, sum_axes(mx::square(d, s), summed_axes(a[i], per_task), false, s), s);
  }
  return total;
}

mx::array make(
    const std::vector<mx::array>& a,
    const std::vector<mx::array>& b,
    bool per_task,
    mx::Stream s) {
  if (s.device == mx::Device::gpu) {
    return composed(a, b, per_task, s);
  }
  std::vector<mx::array> inputs(a);
  inputs.insert(inputs.end(), b.begin(), b.end());
  auto primitive = std::make_shared<SquaredDistance>(s, per_task);
  return mx::array(primitive->output_shapes(inputs)[0], mx::float32, primitive, inputs);
}

} // namespace

mx::array squared_distance(
    const std::vector<mx::array>& a,
    const std::vector<mx::array>& b,
    mx::StreamOrDevice s) {
  if (a.size() != b.size()) {
    throw std::invalid_argument(
        "[metapeft.squared_distance] params and other must have the same number of leaves, got " +
        std::to_string(a.size()) + " and " + std::to_string(b.size()));
  }
  for (size_t i = 0; i < a.size(); ++i) {
    check_float(a[i], "squared_distance", "params", i);
    check_float(b[i], "squared_distance", "other", i);
    if (a[i].shape() != b[i].shape()) {
      fail_leaf(leaf_name("other", i) + " has shape " + shape_str(b[i].shape()) + " but " +
                    leaf_name("params", i) + " has shape " + shape_str(a[i].shape()),
                i);
    }
  }
  if (a.empty()) {
    return mx::array(0.0f);
  }
  return make(a, b, false, mx::to_stream(s));
}

void SquaredDistance::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (auto& in : inputs) {
    encoder.set_input_array(in);
  }
  encoder.set_output_array(out);
  size_t n = inputs.size() / 2;
  int64_t T = per_task_ ? out.shape(0) : 1;
  std::vector<Operand> a, b;
  std::vector<bool> b_shared;
  for (size_t i = 0; i < n; ++i) {
    a.push_back(operand(inputs[i]));
    b.push_back(operand(inputs[n + i]));
    b_shared.push_back(per_task_ && shared(inputs[i], inputs[n + i]));
  }
  encoder.dispatch([a = std::move(a),
                    b = std::move(b),
                    b_shared = std::move(b_shared),
                    T,
                    out_ptr = out.data<float>()]() {
    std::vector<double> total(T, 0.0);
    std::vector<float> sa, sb;
    for (size_t i = 0; i < a.size(); ++i) {
      int64_t size = prod(a[i].shape, 0, a[i].shape.size());
      if (size == 0) {
        continue;
      }
      const float* x = dense_float(a[i], sa);
      const float* y = dense_float(b[i], sb);
      int64_t per = size / T;
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * per;
        const float* yt = y + (b_shared[i] ? 0 : t * per);
        double sum = 0.0;
        for (int64_t j = 0; j < per; ++j) {
          double d = static_cast<double>(xt[j]) - yt[j];
          sum += d * d;
        }
        total[t] += sum;
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      out_ptr[t] = static_cast<float>(total[t]);
    }
  });
}

void SquaredDistance::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "[metapeft.squared_distance] has no Metal kernel: on the GPU, "
      "metapeft.ops.squared_distance is MLX's own ops");
}

std::vector<mx::Shape> SquaredDistance::output_shapes(const std::vector<mx::array>& inputs) {
  if (per_task_) {
    return {{inputs[0].shape(0)}};
  }
  return {{}};
}

std::vector<mx::array> SquaredDistance::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  size_t n = primals.size() / 2;
  auto s = stream();
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    size_t i = arg % n;
    auto& a = primals[i];
    auto& b = primals[n + i];
    // d/da = 2 (a - b) c, d/db = -d/da (summed over the tasks when b is shared).
    auto c = cotangents[0];
    if (per_task_) {
      mx::Shape shape(a.ndim(), 1);
      shape[0] = a.shape(0);
      c = mx::reshape(c, shape, s);
    }
    auto d = mx::subtract(mx::astype(a, mx::float32, s), mx::astype(b, mx::float32, s), s);
    auto g = mx::multiply(mx::multiply(mx::array(2.0f), d, s), c, s);
    if (static_cast<size_t>(arg) >= n) {
      g = mx::negative(g, s);
      if (per_task_ && shared(a, b)) {
        g = sum_axes(g, {0}, false, s);
      }
    }
    grads.push_back(mx::astype(g, primals[arg].dtype(), s));
  }
  return grads;
}

std::vector<mx::array> SquaredDistance::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  size_t n = primals.size() / 2;
  auto s = stream();
  std::optional<mx::array> out;
  for (size_t k = 0; k < argnums.size(); ++k) {
    size_t i = argnums[k] % n;
    auto& a = primals[i];
    auto d = mx::subtract(
        mx::astype(a, mx::float32, s), mx::astype(primals[n + i], mx::float32, s), s);
    auto t = mx::astype(tangents[k], mx::float32, s);
    if (static_cast<size_t>(argnums[k]) >= n) {
      t = mx::negative(t, s);
    }
    auto term = sum_axes(
        mx::multiply(mx::multiply(mx::array(2.0f), d, s), t, s),
        summed_axes(a, per_task_),
        false,
        s);
    out = out ? mx::add(*out, term, s) : term;
  }
  return leaf_tangents({out}, output_shapes(primals), {mx::float32}, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> SquaredDistance::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  size_t n = inputs.size() / 2;
  auto s = stream();
  int V = vmap_size(inputs, axes);
  std::vector<mx::array> a, b;
  if (!per_task_) {
    // The mapped axis becomes the task axis; an unmapped b_i stays shared.
    for (size_t i = 0; i < n; ++i) {
      a.push_back(to_front(inputs[i], axes[i], V, s));
      int ax = axes[n + i];
      b.push_back(ax >= 0 ? mx::moveaxis(inputs[n + i], ax, 0, s) : inputs[n + i]);
    }
    return {{make(a, b, true, s)}, {0}};
  }
  // Fold the mapped axis into the task axis: (V, T, ...) -> (V * T, ...).
  int T = inputs[0].shape(axes[0] == 0 ? 1 : 0);
  for (size_t i = 0; i < n; ++i) {
    int a_ndim = inputs[i].ndim() - (axes[i] >= 0);
    int b_ndim = inputs[n + i].ndim() - (axes[n + i] >= 0);
    a.push_back(fold_tasks(inputs[i], axes[i], V, T, true, s));
    b.push_back(fold_tasks(inputs[n + i], axes[n + i], V, T, b_ndim == a_ndim, s));
  }
  return {{unfold_tasks(make(a, b, true, s), V, s)}, {0}};
}

} // namespace metapeft
