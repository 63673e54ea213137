#include "task_sgd/task_sgd.h"

#include "mlx/backend/cpu/encoder.h"
#include "workers.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.task_sgd] " + msg);
}

// An error about leaf `leaf` (LeafError).
[[noreturn]] void fail_leaf(const std::string& msg, size_t leaf) {
  throw LeafError("[metapeft.task_sgd] " + msg, leaf);
}

// Elements per chunk of work shared among threads.
constexpr int64_t kChunk = 1 << 15;

// out[j] = p[j] - lr[j % lr_len] * g[j] for j in [begin, end).
METAPEFT_SIMD_CLONES
void sgd_range(
    const float* p,
    const float* g,
    const float* lr,
    int64_t lr_len,
    float* out,
    int64_t begin,
    int64_t end) {
  if (lr_len == 1) {
    float a = lr[0];
    METAPEFT_IVDEP
    for (int64_t j = begin; j < end; ++j) {
      out[j] = p[j] - a * g[j];
    }
    return;
  }
  for (int64_t j = begin; j < end;) {
    int64_t k = j % lr_len;
    int64_t stop = std::min(end, j + (lr_len - k));
    const float* l = lr + k - j;
    METAPEFT_IVDEP
    for (; j < stop; ++j) {
      out[j] = p[j] - l[j] * g[j];
    }
  }
}

// The period with which float32 `lr`, broadcast against `p`, repeats over the
// flat parameter when it can be read in place that way (the axes it varies
// along trail those it repeats along, and are laid out row-major), else 0.
int64_t lr_period(const mx::array& lr, const mx::array& p) {
  if (lr.dtype() != mx::float32) {
    return 0;
  }
  auto strides = broadcast_strides(lr, p.ndim());
  auto stride = [&](int ax) { return strides[ax]; };
  // Axes of size 1 do not change the flat layout.
  int64_t period = 1;
  int ax = p.ndim() - 1;
  for (; ax >= 0; --ax) {
    if (p.shape(ax) == 1) {
      continue;
    }
    if (stride(ax) == 0) {
      break;
    }
    if (stride(ax) != period) {
      return 0;
    }
    period *= p.shape(ax);
  }
  for (; ax >= 0; --ax) {
    if (p.shape(ax) != 1 && stride(ax) != 0) {
      return 0;
    }
  }
  return period;
}

} // namespace

std::vector<mx::array> task_sgd(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<mx::array>& lrs,
    mx::StreamOrDevice s) {
  size_t n = params.size();
  if (grads.size() != n || lrs.size() != n) {
    fail("params, grads and lr must have the same number of leaves, got " +
         std::to_string(n) + ", " + std::to_string(grads.size()) + " and " +
         std::to_string(lrs.size()));
  }
  if (n == 0) {
    return {};
  }
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  shapes.reserve(n);
  dtypes.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    auto &p = params[i], &g = grads[i], &lr = lrs[i];
    check_float(p, "task_sgd", "params", i);
    check_float(g, "task_sgd", "grads", i);
    check_float(lr, "task_sgd", "lr", i);
    if (g.shape() != p.shape()) {
      fail_leaf(leaf_name("grads", i) + " has shape " + shape_str(g.shape()) + " but " +
           leaf_name("params", i) + " has shape " + shape_str(p.shape()), i);
    }
    if (!broadcasts_to(lr.shape(), p.shape())) {
      fail_leaf(leaf_name("lr", i) + " of shape " + shape_str(lr.shape()) +
           " does not broadcast against " + leaf_name("params", i) + " of shape " +
           shape_str(p.shape()), i);
    }
    shapes.push_back(p.shape());
    dtypes.push_back(mx::promote_types(p.dtype(), g.dtype()));
  }
  auto stream = mx::to_stream(s);
  return leaf_group_outputs(shapes, dtypes, {&params, &grads, &lrs}, {}, [&] {
    return std::make_shared<TaskSGD>(stream);
  });
}

void TaskSGD::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  size_t n = outputs.size();
  auto& encoder = mx::cpu::get_command_encoder(stream());
  struct Leaf {
    Operand p, g;
    const float* lr;
    int64_t lr_period;
    std::optional<Operand> lr_full; // to gather lr from, when lr_period is 0
    void* out;
    mx::Dtype dtype;
    int64_t size;
  };
  std::vector<Leaf> leaves;
  leaves.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    auto &p = inputs[i], &g = inputs[n + i], &lr = inputs[2 * n + i];
    auto& out = outputs[i];
    donate_or_allocate(p, out);
    encoder.set_input_array(p);
    encoder.set_input_array(g);
    encoder.set_input_array(lr);
    encoder.set_output_array(out);
    Leaf leaf{elementwise_operand(p), elementwise_operand(g), nullptr, lr_period(lr, p),
              {}, out.data<void>(), out.dtype(), static_cast<int64_t>(p.size())};
    if (leaf.lr_period > 0) {
      leaf.lr = lr.data<float>();
    } else {
      leaf.lr_full =
          Operand{lr.data<void>(), lr.dtype(), p.shape(), broadcast_strides(lr, p.ndim()), false};
    }
    leaves.push_back(std::move(leaf));
  }
  encoder.dispatch([leaves = std::move(leaves)]() {
    size_t n = leaves.size();
    std::vector<std::vector<float>> scratch(4 * n);
    std::vector<const float*> p(n), g(n), lr(n);
    std::vector<int64_t> lr_len(n), sizes(n);
    std::vector<float*> out(n);
    for (size_t i = 0; i < n; ++i) {
      auto& L = leaves[i];
      sizes[i] = L.size;
      p[i] = dense_float(L.p, scratch[4 * i]);
      g[i] = dense_float(L.g, scratch[4 * i + 1]);
      if (L.lr_period > 0) {
        lr[i] = L.lr;
        lr_len[i] = L.lr_period;
      } else {
        scratch[4 * i + 2].resize(L.size);
        auto& full = *L.lr_full;
        gather_float(full.ptr, full.dtype, full.shape, full.strides, scratch[4 * i + 2].data());
        lr[i] = scratch[4 * i + 2].data();
        lr_len[i] = L.size;
      }
      out[i] = float_output(L.out, L.dtype, L.size, scratch[4 * i + 3]);
    }
    for_ranges(sizes, kChunk, [&](size_t i, int64_t begin, int64_t end) {
      sgd_range(p[i], g[i], lr[i], lr_len[i], out[i], begin, end);
    });
    for (size_t i = 0; i < n; ++i) {
      store_float_output(scratch[4 * i + 3], leaves[i].out, leaves[i].dtype);
    }
  });
}

std::vector<mx::Shape> TaskSGD::output_shapes(const std::vector<mx::array>& inputs) {
  return leaf_shapes(inputs, inputs.size() / 3);
}

std::vector<mx::array> TaskSGD::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  size_t n = primals.size() / 3;
  auto s = stream();
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    size_t i = arg % n;
    auto& c = cotangents[i];
    auto& g = primals[n + i];
    auto& lr = primals[2 * n + i];
    mx::array grad = c;
    if (arg >= static_cast<int>(2 * n)) {
      grad = sum_to_shape(mx::negative(mx::multiply(c, g, s), s), lr.shape(), s);
    } else if (arg >= static_cast<int>(n)) {
      grad = mx::negative(mx::multiply(lr, c, s), s);
    }
    grads.push_back(mx::astype(grad, primals[arg].dtype(), s));
  }
  return grads;
}

std::vector<mx::array> TaskSGD::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  size_t n = primals.size() / 3;
  auto s = stream();
  std::vector<std::optional<mx::array>> outs(n);
  for (size_t k = 0; k < argnums.size(); ++k) {
    size_t i = argnums[k] % n;
    size_t group = argnums[k] / n;
    auto& t = tangents[k];
    mx::array d = t;
    if (group == 1) {
      d = mx::negative(mx::multiply(primals[2 * n + i], t, s), s);
    } else if (group == 2) {
      d = mx::negative(mx::multiply(t, primals[n + i], s), s);
    }
    outs[i] = outs[i] ? mx::add(*outs[i], d, s) : d;
  }
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < n; ++i) {
    dtypes.push_back(mx::promote_types(primals[i].dtype(), primals[n + i].dtype()));
  }
  return leaf_tangents(outs, leaf_shapes(primals, n), dtypes, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> TaskSGD::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  size_t n = inputs.size() / 3;
  auto s = stream();
  int V = vmap_size(inputs, axes);
  std::vector<mx::array> params, grads, lrs;
  for (size_t i = 0; i < n; ++i) {
    int ap = axes[i], ag = axes[n + i], al = axes[2 * n + i];
    params.push_back(to_front(inputs[i], ap, V, s));
    grads.push_back(to_front(inputs[n + i], ag, V, s));
    auto lr = inputs[2 * n + i];
    if (al >= 0) {
      // Keep the mapped axis aligned with the parameter's new leading axis.
      lr = mx::moveaxis(lr, al, 0, s);
      auto shape = lr.shape();
      int p_ndim = inputs[i].ndim() - (ap >= 0);
      shape.insert(shape.begin() + 1, p_ndim - (lr.ndim() - 1), 1);
      lr = mx::reshape(lr, shape, s);
    }
    lrs.push_back(lr);
  }
  return {task_sgd(params, grads, lrs, s), std::vector<int>(n, 0)};
}

} // namespace metapeft
