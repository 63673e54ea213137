// reptile_update: out_i = params_i + epsilon * (mean_T(adapted_i) - params_i)
// for every leaf i of a parameter tree: one primitive, with one output per leaf,
// for every kLeavesPerPrimitive leaves.
#pragma once

#include "common.h"

namespace metapeft {

// adapted_i has shape (T, *params_i.shape); epsilon is a scalar array.
std::vector<mx::array> reptile_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& adapted,
    const mx::array& epsilon,
    mx::StreamOrDevice s = {});

class ReptileUpdate : public mx::Primitive {
 public:
  explicit ReptileUpdate(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftReptileUpdate";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return true;
  }
};

} // namespace metapeft
