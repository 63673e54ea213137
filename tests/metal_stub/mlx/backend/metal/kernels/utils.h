// Stand-in for MLX's Metal kernel utilities: elem_to_loc as MLX writes it, and
// instantiate_kernel registering each instantiation by name with the harness.
#pragma once

#include <metal_stdlib>

#include "harness.h"

template <typename IdxT = int64_t>
METAL_FUNC IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

#define STUB_CAT2(a, b) a##b
#define STUB_CAT(a, b) STUB_CAT2(a, b)
#define instantiate_kernel(name, func, ...) \
  static const bool STUB_CAT(stub_kernel_, __COUNTER__) = stub::add(name, &func<__VA_ARGS__>);
