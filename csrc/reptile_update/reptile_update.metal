// metapeft_reptile_update_<p>_<a>_<eps>: out = p + eps * (sum_t a[t] / T - p) for
// one leaf, one thread per element, instantiated per dtype of p, a and eps as MLX
// instantiates its kernels; out has MLX's promotion of p's and a's dtypes.
//
// p and a keep their strides; eps is read from its buffer. Arithmetic is float32
// (the mean as sum * (1 / T), so T = 0 gives NaN) and the output, contiguous, is
// rounded once, as the CPU kernel does. out may share p's buffer (p donated):
// each thread reads its element before writing it.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

#include "kernels.h"

// shape and p_strides describe p; a_strides are a's strides without the task
// axis, whose stride is a_task_stride. The grid is (width, height) with
// index = y * width + x; threads past `size` do nothing.
template <typename P, typename A, typename E, typename O>
[[kernel]] void reptile_update(
    const device P* p [[buffer(0)]],
    const device A* a [[buffer(1)]],
    const device E* eps [[buffer(2)]],
    device O* out [[buffer(3)]],
    constant const int* shape [[buffer(4)]],
    constant const int64_t* p_strides [[buffer(5)]],
    constant const int64_t* a_strides [[buffer(6)]],
    constant const int& ndim [[buffer(7)]],
    constant const int64_t& size [[buffer(8)]],
    constant const int64_t& tasks [[buffer(9)]],
    constant const int64_t& a_task_stride [[buffer(10)]],
    uint2 pos [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(pos.y) * grid.x + pos.x;
  if (i >= size) {
    return;
  }
  int64_t a_loc = elem_to_loc<int64_t>(i, shape, a_strides, ndim);
  float acc = 0.0f;
  for (int64_t t = 0; t < tasks; ++t) {
    acc += static_cast<float>(a[a_loc + t * a_task_stride]);
  }
  float mean = acc * (1.0f / static_cast<float>(tasks));
  float pv = static_cast<float>(p[elem_to_loc<int64_t>(i, shape, p_strides, ndim)]);
  float e = static_cast<float>(eps[0]);
  out[i] = static_cast<O>(pv + e * (mean - pv));
}

#define instantiate_reptile_update(pn, P, an, A, O) \
  METAPEFT_INSTANTIATE_3(reptile_update, reptile_update, pn, P, an, A, O)

METAPEFT_FLOAT_PAIRS(instantiate_reptile_update)
