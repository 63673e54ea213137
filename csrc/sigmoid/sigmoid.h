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

  METAPEFT_PRIMITIVE_OVERRIDES
  const char* name() const override {
    return "MetapeftSigmoid";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace metapeft
