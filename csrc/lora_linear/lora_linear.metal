// LoRA linear in two passes, one thread per element of each result:
//   metapeft_lora_down:   h[row, j]   = sum_k x[row, k] * a[task, k, j]      (float32)
//   metapeft_lora_linear: out[row, n] = bias[task, n] + sum_k x[row, k] * w[task, n, k]
//                                       + scale * sum_j h[row, j] * b[task, j, n]
// The rows are x.shape[:-1] flattened (the task axis first when per task);
// row r belongs to task r / M. Operands keep their own dtype (a code from the
// host) and strides; a task stride of 0 shares an operand across tasks.
// Arithmetic is float32 and the output is rounded once.

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

#include "kernels.h"

// a_strides is (task, k, j). dtypes: x, a. h is (rows, R), contiguous.
[[kernel]] void metapeft_lora_down(
    const device uint8_t* x [[buffer(0)]],
    const device uint8_t* a [[buffer(1)]],
    device float* h [[buffer(2)]],
    constant const int* x_shape [[buffer(3)]],
    constant const int64_t* x_strides [[buffer(4)]],
    constant const int& x_ndim [[buffer(5)]],
    constant const int64_t* a_strides [[buffer(6)]],
    constant const int* dtypes [[buffer(7)]],
    constant const int64_t& M [[buffer(8)]],
    constant const int64_t& K [[buffer(9)]],
    constant const int64_t& R [[buffer(10)]],
    uint2 pos [[thread_position_in_grid]]) {
  int64_t j = pos.x;
  int64_t row = pos.y;
  int64_t task = row / M;

  int64_t x_loc = elem_to_loc<int64_t>(row, x_shape, x_strides, x_ndim - 1);
  int64_t x_step = x_strides[x_ndim - 1];
  int64_t a_loc = task * a_strides[0] + j * a_strides[2];
  int64_t a_step = a_strides[1];

  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    acc += metapeft::load(x, dtypes[0], x_loc + k * x_step) *
        metapeft::load(a, dtypes[1], a_loc + k * a_step);
  }
  h[row * R + j] = acc;
}

// w_strides is (task, n, k), b_strides (task, j, n), bias_strides (task, n).
// dtypes: x, w, b, bias (-1: no bias), out. R = 0 skips the low-rank term
// (h and b are then never read).
[[kernel]] void metapeft_lora_linear(
    const device uint8_t* x [[buffer(0)]],
    const device uint8_t* w [[buffer(1)]],
    const device float* h [[buffer(2)]],
    const device uint8_t* b [[buffer(3)]],
    const device uint8_t* bias [[buffer(4)]],
    device uint8_t* out [[buffer(5)]],
    constant const int* x_shape [[buffer(6)]],
    constant const int64_t* x_strides [[buffer(7)]],
    constant const int& x_ndim [[buffer(8)]],
    constant const int64_t* w_strides [[buffer(9)]],
    constant const int64_t* b_strides [[buffer(10)]],
    constant const int64_t* bias_strides [[buffer(11)]],
    constant const int* dtypes [[buffer(12)]],
    constant const int64_t& M [[buffer(13)]],
    constant const int64_t& N [[buffer(14)]],
    constant const int64_t& K [[buffer(15)]],
    constant const int64_t& R [[buffer(16)]],
    constant const float& scale [[buffer(17)]],
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
  if (dtypes[3] >= 0) {
    acc += metapeft::load(
        bias, dtypes[3], task * bias_strides[0] + n * bias_strides[1]);
  }

  int64_t b_loc = task * b_strides[0] + n * b_strides[2];
  int64_t b_step = b_strides[1];
  float low_rank = 0.0f;
  for (int64_t j = 0; j < R; ++j) {
    low_rank += h[row * R + j] * metapeft::load(b, dtypes[2], b_loc + j * b_step);
  }
  if (R > 0) {
    acc += scale * low_rank;
  }
  metapeft::store(out, dtypes[4], row * N + n, acc);
}
