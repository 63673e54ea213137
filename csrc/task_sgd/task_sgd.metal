// metapeft_task_sgd_<p>_<g>_<lr>: out = p - lr * g for one leaf, one thread per
// element, instantiated per dtype of p, g and lr as MLX instantiates its kernels;
// out has MLX's promotion of p's and g's dtypes.
//
// Each operand keeps its strides; lr's are already broadcast to p's shape (0
// where it repeats). Arithmetic is float32 and the output, contiguous, is rounded
// once, as the CPU kernel does. out may share p's buffer (p donated): each thread
// reads its element before writing it.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

#include "kernels.h"

// The grid is (width, height) with index = y * width + x; threads past `size`
// do nothing.
template <typename P, typename G, typename L, typename O>
[[kernel]] void task_sgd(
    const device P* p [[buffer(0)]],
    const device G* g [[buffer(1)]],
    const device L* lr [[buffer(2)]],
    device O* out [[buffer(3)]],
    constant const int* shape [[buffer(4)]],
    constant const int64_t* p_strides [[buffer(5)]],
    constant const int64_t* g_strides [[buffer(6)]],
    constant const int64_t* lr_strides [[buffer(7)]],
    constant const int& ndim [[buffer(8)]],
    constant const int64_t& size [[buffer(9)]],
    uint2 pos [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(pos.y) * grid.x + pos.x;
  if (i >= size) {
    return;
  }
  float pv = static_cast<float>(p[elem_to_loc<int64_t>(i, shape, p_strides, ndim)]);
  float gv = static_cast<float>(g[elem_to_loc<int64_t>(i, shape, g_strides, ndim)]);
  float lv = static_cast<float>(lr[elem_to_loc<int64_t>(i, shape, lr_strides, ndim)]);
  out[i] = static_cast<O>(pv - lv * gv);
}

#define instantiate_task_sgd(pn, P, gn, G, O) \
  METAPEFT_INSTANTIATE_3(task_sgd, task_sgd, pn, P, gn, G, O)

METAPEFT_FLOAT_PAIRS(instantiate_task_sgd)
