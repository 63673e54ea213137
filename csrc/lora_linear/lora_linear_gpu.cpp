// LoraLinear::eval_gpu: the Metal kernels in lora_linear.metal, built on Apple only.
#include "lora_linear/lora_linear.h"

namespace metapeft {

#ifndef _METAL_
void LoraLinear::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.lora_linear] this build has no Metal kernels");
}
#endif

} // namespace metapeft
