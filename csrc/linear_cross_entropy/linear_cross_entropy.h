// linear_cross_entropy(x, weight, targets): cross_entropy(x @ weight^T, targets),
// the loss of a language model from its last hidden states and output layer,
// without the (rows, V) logits: they are made and consumed a block of vocabulary
// columns at a time, and the loss's gradient with respect to x is made in the same
// pass.
#pragma once

#include "common.h"

namespace metapeft {

// x (..., d) and weight (V, d) float32/float16/bfloat16, targets (...) of an
// integer dtype -> (...) float32. A target outside [0, V) gives NaN. On a GPU
// stream it is MLX's own ops.
mx::array linear_cross_entropy(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& targets,
    mx::StreamOrDevice s = {});

// Inputs {x, weight, int32 targets}; outputs {loss (...), row_grads (..., d)},
// both float32, where row_grads[r] = (softmax(logits[r]) - onehot(targets[r])) @
// weight is the gradient of loss[r] with respect to x[r]. The backward pass of the
// loss scales row_grads by the incoming gradient: no second pass over the
// vocabulary. The weight's gradient, and second order, go through the MLX-ops
// form (which holds the logits).
class LinearCrossEntropy : public mx::Primitive {
 public:
  explicit LinearCrossEntropy(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftLinearCrossEntropy";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace metapeft
