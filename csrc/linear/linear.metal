// metapeft_linear: out[row, n] = bias[b, n] + sum_k x[row, k] * w[b, n, k].
//
// One thread per output element. Operands keep their own dtype (float32,
// float16 or bfloat16, given as a code by the host) and their own strides;
// arithmetic is float32 and the result is rounded once to the output dtype.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

#include "kernels.h"

// The rows are x.shape[:-1] flattened (the task axis first when per task);
// row r belongs to task r / M. w_strides is (task, n, k), 0 for a shared
// weight; bias_strides is (task, n). dtypes: x, w, bias (-1: no bias), out.
[[kernel]] void metapeft_linear(
    const device uint8_t* x [[buffer(0)]],
    const device uint8_t* w [[buffer(1)]],
    const device uint8_t* bias [[buffer(2)]],
    device uint8_t* out [[buffer(3)]],
    constant const int* x_shape [[buffer(4)]],
    constant const int64_t* x_strides [[buffer(5)]],
    constant const int& x_ndim [[buffer(6)]],
    constant const int64_t* w_strides [[buffer(7)]],
    constant const int64_t* bias_strides [[buffer(8)]],
    constant const int* dtypes [[buffer(9)]],
    constant const int64_t& M [[buffer(10)]],
    constant const int64_t& N [[buffer(11)]],
    constant const int64_t& K [[buffer(12)]],
    uint2 pos [[thread_position_in_grid]]) {
  int64_t n = pos.x;
  int64_t row = pos.y;
  int64_t task = row / M;

  int64_t x_loc = elem_to_loc<int64_t>(row, x_shape, x_strides, x_ndim - 1);
  int64_t x_step = x_strides[x_ndim - 1];
  int64_t w_loc = task * w_strides[0] + n * w_strides[1];
  int64_t w_step = w_strides[2];

  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    acc += metapeft::load(x, dtypes[0], x_loc + k * x_step) *
        metapeft::load(w, dtypes[1], w_loc + k * w_step);
  }
  if (dtypes[2] >= 0) {
    acc += metapeft::load(
        bias, dtypes[2], task * bias_strides[0] + n * bias_strides[1]);
  }
  metapeft::store(out, dtypes[3], row * N + n, acc);
}
