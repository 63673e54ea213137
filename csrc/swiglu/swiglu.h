// swiglu(gate, up) = silu(gate) * up = gate * sigmoid(gate) * up, the activation
// of Llama-family MLPs, fused in both directions: the backward pass (SwigluGrad)
// needs only gate and up, so a layer keeps two arrays for it instead of four.
#pragma once

#include "common.h"

namespace metapeft {

// gate and up of one shape; the result has the dtype of promote(gate, up) and
// is computed in float32. On a GPU stream it is MLX's own ops.
mx::array swiglu(const mx::array& gate, const mx::array& up, mx::StreamOrDevice s = {});

class Swiglu : public mx::Primitive {
 public:
  explicit Swiglu(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftSwiglu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// (d gate, d up) of <g, swiglu(gate, up)>: inputs {gate, up, g}. Its own
// derivatives (second order) are those of the same maths written with MLX ops.
class SwigluGrad : public mx::Primitive {
 public:
  explicit SwigluGrad(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftSwigluGrad";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace metapeft
