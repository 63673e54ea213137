// lora_linear(x, W, A, B, scale, bias) = x @ W.T + bias + scale * (x @ A) @ B,
// with one adapter (A (d_in, r), B (r, d_out)) or one per task (A (T, d_in, r),
// B (T, r, d_out), x (T, ..., d_in)). The low-rank product stays two thin matmuls.
#pragma once

#include <optional>

#include "common.h"

namespace metapeft {

mx::array lora_linear(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& lora_a,
    const mx::array& lora_b,
    float scale,
    const std::optional<mx::array>& bias = std::nullopt,
    mx::StreamOrDevice s = {});

class LoraLinear : public mx::Primitive {
 public:
  explicit LoraLinear(mx::Stream stream, float scale) : mx::Primitive(stream), scale_(scale) {}

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
    return "MetapeftLoraLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const LoraLinear&>(other).scale_;
  }

  float scale() const {
    return scale_;
  }

 private:
  const float scale_;
};

} // namespace metapeft
