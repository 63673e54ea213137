// squared_distance: the sum over every leaf i of sum((a_i - b_i)^2), one float32
// scalar for two parameter trees. Under vmap, one per task: a_i (T, ...) against
// b_i (T, ...), or against a b_i (...) shared by the tasks, gives (T,).
#pragma once

#include "common.h"

namespace metapeft {

// a_i and b_i have the same shape.
mx::array squared_distance(
    const std::vector<mx::array>& a,
    const std::vector<mx::array>& b,
    mx::StreamOrDevice s = {});

class SquaredDistance : public mx::Primitive {
 public:
  SquaredDistance(mx::Stream stream, bool per_task)
      : mx::Primitive(stream), per_task_(per_task) {}

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
    return "MetapeftSquaredDistance";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return per_task_ == static_cast<const SquaredDistance&>(other).per_task_;
  }

 private:
  bool per_task_;
};

} // namespace metapeft
