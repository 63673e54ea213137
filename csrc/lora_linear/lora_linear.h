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

  METAPEFT_PRIMITIVE_OVERRIDES
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
