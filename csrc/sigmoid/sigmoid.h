// sigmoid(x) = 1 / (1 + exp(-x)), elementwise and multithreaded: the gate of
// SiLU / SwiGLU MLPs (silu(x) = x * sigmoid(x)).
#pragma once

#include "common.h"

namespace metapeft {

// The result has x's dtype; arithmetic is float32. On a GPU stream it is
// MLX's own sigmoid.
mx::array sigmoid(const mx::array& x, mx::StreamOrDevice s = {});

class Sigmoid : public mx::Primitive {
 public:
  explicit Sigmoid(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftSigmoid";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace metapeft
