// TaskSGD::eval_gpu: the Metal kernel in task_sgd.metal, built on Apple only.
#include "task_sgd/task_sgd.h"

namespace metapeft {

#ifndef _METAL_
void TaskSGD::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[metapeft.task_sgd] this build has no Metal kernels");
}
#endif

} // namespace metapeft
