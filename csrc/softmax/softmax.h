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

  METAPEFT_PRIMITIVE_OVERRIDES
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
