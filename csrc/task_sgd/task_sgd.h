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

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "MetapeftTaskSGD";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return true;
  }
};

} // namespace metapeft
