// Linear::eval_gpu: the Metal kernel in linear.metal, built on Apple only.
#include "linear/linear.h"

namespace metapeft {

#ifndef _METAL_
void Linear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.linear] this build has no Metal kernels");
}
#endif

} // namespace metapeft
