#include "reptile_update/reptile_update.h"

#include <cmath>
#include <numeric>

#include "mlx/backend/cpu/encoder.h"
#include "workers.h"

namespace metapeft {

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[metapeft.reptile_update] " + msg);
}

// An error about leaf `leaf` (LeafError).
[[noreturn]] void fail_leaf(const std::string& msg, size_t leaf) {
  throw LeafError("[metapeft.reptile_update] " + msg, leaf);
}

// Elements read and written per chunk of work shared among threads.
constexpr int64_t kChunk = 1 << 15;

// Elements of a parameter handled together, so the task sum stays in cache.
constexpr int64_t kBlock = 512;

// out[j] = p[j] + eps * (mean_t a[t, j] - p[j]) for j in [begin, end), where
// a holds `tasks` rows of `size` values.
METAPEFT_SIMD_CLONES
void reptile_range(
    const float* p,
    const float* a,
    int64_t tasks,
    int64_t size,
    float eps,
    float* out,
    int64_t begin,
    int64_t end) {
  // T == 0 gives 0 * inf = NaN, as the mean over no tasks is in MLX.
  float inv_t = 1.0f / static_cast<float>(tasks);
  float acc[kBlock];
  for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
    int64_t len = std::min(kBlock, end - j0);
    std::fill(acc, acc + len, 0.0f);
    for (int64_t t = 0; t < tasks; ++t) {
      const float* at = a + t * size + j0;
      for (int64_t j = 0; j < len; ++j) {
        acc[j] += at[j];
      }
    }
    METAPEFT_IVDEP
    for (int64_t j = 0; j < len; ++j) {
      out[j0 + j] = p[j0 + j] + eps * (acc[j] * inv_t - p[j0 + j]);
    }
  }
}

mx::array task_mean(const mx::array& a, mx::StreamOrDevice s) {
  // The mean over no tasks is NaN (as in MLX), without reducing an empty array.
  auto a32 = mx::astype(a, mx::float32, s);
  auto count = mx::array(static_cast<float>(a.shape(0)));
  return mx::divide(sum_axes(a32, {0}, false, s), count, s);
}

} // namespace

std::vector<mx::array> reptile_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& adapted,
    const mx::array& epsilon,
    mx::StreamOrDevice s) {
  size_t n = params.size();
  if (adapted.size() != n) {
    fail("params and adapted must have the same number of leaves, got " +
         std::to_string(n) + " and " + std::to_string(adapted.size()));
  }
  check_float(epsilon, "reptile_update", "epsilon");
  if (epsilon.ndim() != 0) {
    fail("epsilon must be a scalar, got shape " + shape_str(epsilon.shape()));
  }
  if (n == 0) {
    return {};
  }
  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  shapes.reserve(n);
  dtypes.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    auto &p = params[i], &a = adapted[i];
    check_float(p, "reptile_update", "params", i);
    check_float(a, "reptile_update", "adapted", i);
    bool ok = a.ndim() == p.ndim() + 1;
    for (size_t ax = 0; ok && ax < p.ndim(); ++ax) {
      ok = a.shape(ax + 1) == p.shape(ax);
    }
    if (!ok) {
      auto expected = p.shape();
      expected.insert(expected.begin(), a.ndim() ? a.shape(0) : 0);
      fail_leaf(leaf_name("adapted", i) + " must have shape (T, *" + leaf_name("params", i) +
           ".shape) = (T, " + shape_str(p.shape()).substr(1) + ", got " + shape_str(a.shape()), i);
    }
    shapes.push_back(p.shape());
    dtypes.push_back(mx::promote_types(p.dtype(), a.dtype()));
  }
  auto stream = mx::to_stream(s);
  return leaf_group_outputs(shapes, dtypes, {&params, &adapted}, {epsilon}, [&] {
    return std::make_shared<ReptileUpdate>(stream);
  });
}

void ReptileUpdate::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  size_t n = outputs.size();
  auto& encoder = mx::cpu::get_command_encoder(stream());
  struct Leaf {
    Operand p, a;
    void* out;
    mx::Dtype dtype;
    int64_t size;
    int64_t tasks;
  };
  std::vector<Leaf> leaves;
  leaves.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    auto &p = inputs[i], &a = inputs[n + i];
    auto& out = outputs[i];
    donate_or_allocate(p, out);
    encoder.set_input_array(p);
    encoder.set_input_array(a);
    encoder.set_output_array(out);
    leaves.push_back({elementwise_operand(p), elementwise_operand(a), out.data<void>(),
                      out.dtype(), static_cast<int64_t>(p.size()), a.shape(0)});
  }
  encoder.set_input_array(inputs.back());
  encoder.dispatch([leaves = std::move(leaves), eps_op = operand(inputs.back())]() {
    float eps = scalar_float(eps_op);
    size_t n = leaves.size();
    std::vector<std::vector<float>> scratch(3 * n);
    std::vector<const float*> p(n), a(n);
    std::vector<float*> out(n);
    std::vector<int64_t> sizes(n);
    for (size_t i = 0; i < n; ++i) {
      auto& L = leaves[i];
      sizes[i] = L.size;
      p[i] = dense_float(L.p, scratch[3 * i]);
      a[i] = dense_float(L.a, scratch[3 * i + 1]);
      out[i] = float_output(L.out, L.dtype, L.size, scratch[3 * i + 2]);
    }
    int64_t chunk = std::max<int64_t>(kChunk / (leaves[0].tasks + 2), kBlock);
    for_ranges(sizes, chunk, [&](size_t i, int64_t begin, int64_t end) {
      reptile_range(p[i], a[i], leaves[i].tasks, sizes[i], eps, out[i], begin, end);
    });
    for (size_t i = 0; i < n; ++i) {
      store_float_output(scratch[3 * i + 2], leaves[i].out, leaves[i].dtype);
    }
  });
}

std::vector<mx::Shape> ReptileUpdate::output_shapes(const std::vector<mx::array>& inputs) {
  return leaf_shapes(inputs, inputs.size() / 2);
}

std::vector<mx::array> ReptileUpdate::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  size_t n = primals.size() / 2;
  auto s = stream();
  auto eps = mx::astype(primals.back(), mx::float32, s);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    mx::array grad = eps;
    if (arg == static_cast<int>(2 * n)) {
      std::optional<mx::array> total;
      for (size_t i = 0; i < n; ++i) {
        auto diff = mx::subtract(task_mean(primals[n + i], s), primals[i], s);
        auto prod = mx::multiply(cotangents[i], diff, s);
        std::vector<int> all(prod.ndim());
        std::iota(all.begin(), all.end(), 0);
        auto term = sum_axes(prod, all, false, s);
        total = total ? mx::add(*total, term, s) : term;
      }
      grad = *total;
    } else if (arg >= static_cast<int>(n)) {
      auto& a = primals[arg];
      auto& c = cotangents[arg - n];
      auto scaled = mx::divide(mx::multiply(eps, c, s), mx::array(a.shape(0), mx::float32), s);
      grad = mx::broadcast_to(mx::expand_dims(scaled, 0, s), a.shape(), s);
    } else {
      grad = mx::multiply(mx::subtract(mx::array(1.0f), eps, s), cotangents[arg], s);
    }
    grads.push_back(mx::astype(grad, primals[arg].dtype(), s));
  }
  return grads;
}

std::vector<mx::array> ReptileUpdate::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>& argnums) {
  size_t n = primals.size() / 2;
  auto s = stream();
  auto eps = mx::astype(primals.back(), mx::float32, s);
  std::vector<std::optional<mx::array>> outs(n);
  auto add = [&](size_t i, const mx::array& d) {
    outs[i] = outs[i] ? mx::add(*outs[i], d, s) : d;
  };
  for (size_t k = 0; k < argnums.size(); ++k) {
    size_t arg = argnums[k];
    auto& t = tangents[k];
    if (arg == 2 * n) {
      for (size_t i = 0; i < n; ++i) {
        add(i, mx::multiply(t, mx::subtract(task_mean(primals[n + i], s), primals[i], s), s));
      }
    } else if (arg >= n) {
      add(arg - n, mx::multiply(eps, task_mean(t, s), s));
    } else {
      add(arg, mx::multiply(mx::subtract(mx::array(1.0f), eps, s), t, s));
    }
  }
  std::vector<mx::Dtype> dtypes;
  for (size_t i = 0; i < n; ++i) {
    dtypes.push_back(mx::promote_types(primals[i].dtype(), primals[n + i].dtype()));
  }
  return leaf_tangents(outs, leaf_shapes(primals, n), dtypes, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> ReptileUpdate::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  size_t n = inputs.size() / 2;
  auto s = stream();
  int V = vmap_size(inputs, axes);
  std::vector<mx::array> params, adapted;
  for (size_t i = 0; i < n; ++i) {
    params.push_back(to_front(inputs[i], axes[i], V, s));
    // The task axis stays in front: adapted becomes (T, V, ...).
    auto& a = inputs[n + i];
    int aa = axes[n + i];
    if (aa >= 0) {
      adapted.push_back(mx::moveaxis(a, aa, 1, s));
    } else {
      auto shape = a.shape();
      shape.insert(shape.begin() + 1, V);
      adapted.push_back(mx::broadcast_to(mx::expand_dims(a, 1, s), shape, s));
    }
  }
  int ae = axes.back();
  if (ae < 0) {
    return {reptile_update(params, adapted, inputs.back(), s), std::vector<int>(n, 0)};
  }
  // A mapped epsilon is no longer one scalar: the same update in MLX ops.
  auto eps = mx::astype(inputs.back(), mx::float32, s);
  std::vector<mx::array> outs;
  for (size_t i = 0; i < n; ++i) {
    auto shape = mx::Shape(params[i].ndim(), 1);
    shape[0] = V;
    auto e = mx::reshape(eps, shape, s);
    auto diff = mx::subtract(task_mean(adapted[i], s), params[i], s);
    auto dtype = mx::promote_types(params[i].dtype(), adapted[i].dtype());
    outs.push_back(mx::astype(mx::add(params[i], mx::multiply(e, diff, s), s), dtype, s));
  }
  return {outs, std::vector<int>(n, 0)};
}

} // namespace metapeft
