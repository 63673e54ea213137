// task_sgd: out_i = params_i - lr_i * grads_i for every leaf i of a parameter
// tree, all tasks at once: one primitive, with one output per leaf, for every
// kLeavesPerPrimitive leaves.
#pragma once

#include "common.h"

namespace metapeft {

// lr_i broadcasts (numpy rules) against params_i; out_i keeps
// promote(params_i, grads_i)'s dtype. Arithmetic is float32.
std::vector<mx::array> task_sgd(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<mx::array>& lrs,
    mx::StreamOrDevice s = {});

class TaskSGD : public mx::Primitive {
 public:
  explicit TaskSGD(mx::Stream stream) : mx::Primitive(stream) {}

  METAPEFT_PRIMITIVE_OVERRIDES
  const char* name() const override {
    return "MetapeftTaskSGD";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return true;
  }
};

} // namespace metapeft
