// metapeft_task_sgd: out = p - lr * g for one leaf, one thread per element.
//
// p, g and lr keep their own dtype (a code from the host) and strides; lr's
// strides are already broadcast to p's shape (0 where it repeats). Arithmetic
// is float32 and the output, contiguous, is rounded once. out may share p's
// buffer (p donated): each thread reads its element before writing it.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

#include "kernels.h"

// The grid is (width, height) with index = y * width + x; threads past `size`
// do nothing. dtypes: p, g, lr, out.
[[kernel]] void metapeft_task_sgd(
    const device uint8_t* p [[buffer(0)]],
    const device uint8_t* g [[buffer(1)]],
    const device uint8_t* lr [[buffer(2)]],
    device uint8_t* out [[buffer(3)]],
    constant const int* shape [[buffer(4)]],
    constant const int64_t* p_strides [[buffer(5)]],
    constant const int64_t* g_strides [[buffer(6)]],
    constant const int64_t* lr_strides [[buffer(7)]],
    constant const int& ndim [[buffer(8)]],
    constant const int* dtypes [[buffer(9)]],
    constant const int64_t& size [[buffer(10)]],
    uint2 pos [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(pos.y) * grid.x + pos.x;
  if (i >= size) {
    return;
  }
  float pv = metapeft::load(p, dtypes[0], elem_to_loc<int64_t>(i, shape, p_strides, ndim));
  float gv = metapeft::load(g, dtypes[1], elem_to_loc<int64_t>(i, shape, g_strides, ndim));
  float lv = metapeft::load(lr, dtypes[2], elem_to_loc<int64_t>(i, shape, lr_strides, ndim));
  metapeft::store(out, dtypes[3], i, pv - lv * gv);
}
