// metapeft_reptile_update: out = p + eps * (sum_t a[t] / T - p) for one leaf,
// one thread per element.
//
// p, a and eps keep their own dtype (a code from the host) and strides; eps is
// read from its buffer. Arithmetic is float32 (the mean as sum * (1 / T), so
// T = 0 gives NaN) and the output, contiguous, is rounded once. out may share
// p's buffer (p donated): each thread reads its element before writing it.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

#include "kernels.h"

// shape and p_strides describe p; a_strides are a's strides without the task
// axis, whose stride is a_task_stride. The grid is (width, height) with
// index = y * width + x; threads past `size` do nothing. dtypes: p, a, eps, out.
[[kernel]] void metapeft_reptile_update(
    const device uint8_t* p [[buffer(0)]],
    const device uint8_t* a [[buffer(1)]],
    const device uint8_t* eps [[buffer(2)]],
    device uint8_t* out [[buffer(3)]],
    constant const int* shape [[buffer(4)]],
    constant const int64_t* p_strides [[buffer(5)]],
    constant const int64_t* a_strides [[buffer(6)]],
    constant const int& ndim [[buffer(7)]],
    constant const int* dtypes [[buffer(8)]],
    constant const int64_t& size [[buffer(9)]],
    constant const int64_t& tasks [[buffer(10)]],
    constant const int64_t& a_task_stride [[buffer(11)]],
    uint2 pos [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(pos.y) * grid.x + pos.x;
  if (i >= size) {
    return;
  }
  int64_t a_loc = elem_to_loc<int64_t>(i, shape, a_strides, ndim);
  float acc = 0.0f;
  for (int64_t t = 0; t < tasks; ++t) {
    acc += metapeft::load(a, dtypes[1], a_loc + t * a_task_stride);
  }
  float mean = acc * (1.0f / static_cast<float>(tasks));
  float pv = metapeft::load(p, dtypes[0], elem_to_loc<int64_t>(i, shape, p_strides, ndim));
  float e = metapeft::load(eps, dtypes[2], 0);
  metapeft::store(out, dtypes[3], i, pv + e * (mean - pv));
}
