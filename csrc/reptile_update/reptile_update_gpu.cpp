// ReptileUpdate::eval_gpu: the Metal kernel in reptile_update.metal, built on Apple only.
#include "reptile_update/reptile_update.h"

namespace metapeft {

#ifndef _METAL_
void ReptileUpdate::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.reptile_update] this build has no Metal kernels");
}
#endif

} // namespace metapeft
