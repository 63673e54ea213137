// Kernel-side helpers shared by the .metal sources (<op>/<op>.metal); the Metal
// compiler finds this file through the INCLUDE_DIRS that CMakeLists.txt passes
// to mlx_build_metallib. The host side of the dtype codes is dtype_code in metal.h.
#pragma once

#include <metal_stdlib>

#include "mlx/backend/metal/kernels/utils.h"

namespace metapeft {

// Element i of a buffer of dtype code 0 (float32), 1 (float16) or 2 (bfloat16).
inline float load(const device uint8_t* p, int dtype, int64_t i) {
  if (dtype == 1) {
    half v = ((const device half*)p)[i];
    return static_cast<float>(v);
  }
  if (dtype == 2) {
    bfloat16_t v = ((const device bfloat16_t*)p)[i];
    return static_cast<float>(v);
  }
  return ((const device float*)p)[i];
}

// Writes v, rounded once, as element i of a buffer of the given dtype code.
inline void store(device uint8_t* p, int dtype, int64_t i, float v) {
  if (dtype == 1) {
    ((device half*)p)[i] = static_cast<half>(v);
  } else if (dtype == 2) {
    ((device bfloat16_t*)p)[i] = static_cast<bfloat16_t>(v);
  } else {
    ((device float*)p)[i] = v;
  }
}

} // namespace metapeft
