// Kernel-side helpers shared by the .metal sources (<op>/<op>.metal); the Metal
// compiler finds this file through the INCLUDE_DIRS that CMakeLists.txt passes
// to mlx_build_metallib. The host picks a kernel by the names of its operands'
// dtypes (kernel_name in metal.h).
#pragma once

// Calls X(a_name, A, b_name, B, Out) for every pair of the three float dtypes,
// with Out MLX's promotion of the two (float16 with bfloat16 gives float32).
#define METAPEFT_FLOAT_PAIRS(X)                                 \
  X(float32, float, float32, float, float)                      \
  X(float32, float, float16, half, float)                       \
  X(float32, float, bfloat16, bfloat16_t, float)                \
  X(float16, half, float32, float, float)                       \
  X(float16, half, float16, half, half)                         \
  X(float16, half, bfloat16, bfloat16_t, float)                 \
  X(bfloat16, bfloat16_t, float32, float, float)                \
  X(bfloat16, bfloat16_t, float16, half, float)                 \
  X(bfloat16, bfloat16_t, bfloat16, bfloat16_t, bfloat16_t)

// Instantiates kernel `func` as "metapeft_<op>_<a>_<b>_<c>" for a pair (a, b) of
// METAPEFT_FLOAT_PAIRS and each float dtype c of a third operand: 27 kernels.
#define METAPEFT_INSTANTIATE_3(op, func, an, A, bn, B, Out)                         \
  instantiate_kernel("metapeft_" #op "_" #an "_" #bn "_float32", func, A, B, float, Out) \
  instantiate_kernel("metapeft_" #op "_" #an "_" #bn "_float16", func, A, B, half, Out)  \
  instantiate_kernel("metapeft_" #op "_" #an "_" #bn "_bfloat16", func, A, B, bfloat16_t, Out)
