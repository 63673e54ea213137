// softmax(x, scale, causal): the softmax over the last axis of scale * x, with
// an optional causal mask over the last two axes (L queries by S keys): query
// i sees keys j <= i + S - L, as "causal" in mx.fast.scaled_dot_product_attention.
#pragma once

#include "common.h"

namespace metapeft {

// The result has x's dtype; arithmetic is float32. Masked entries are 0, and a
// query that sees no key (i + S - L < 0) gets a row of zeros. On a GPU stream
// it is MLX's own softmax (no metapeft kernel).
mx::array softmax(const mx::array& x, float scale, bool causal, mx::StreamOrDevice s = {});

class Softmax : public mx::Primitive {
 public:
  Softmax(mx::Stream stream, float scale, bool causal)
      : mx::Primitive(stream), scale_(scale), causal_(causal) {}

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
    return "MetapeftSoftmax";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Softmax&>(other);
    return scale_ == o.scale_ && causal_ == o.causal_;
  }

 private:
  const float scale_;
  const bool causal_;
};

} // namespace metapeft
