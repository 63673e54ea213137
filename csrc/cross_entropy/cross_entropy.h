// cross_entropy(logits, targets): per-row -log softmax(logits)[target], the
// loss of a classifier or a language model, fused: one pass over the logits.
#pragma once

#include "common.h"

namespace metapeft {

// logits (..., V) float32/float16/bfloat16, targets (...) of an integer dtype
// -> (...) float32. A target outside [0, V) gives NaN (the inputs are not
// read before evaluation). On a GPU stream it is MLX's own ops.
mx::array cross_entropy(const mx::array& logits, const mx::array& targets, mx::StreamOrDevice s = {});

// `targets` checked against `rows` (an integer dtype; the shape of `rows` without
// its last axis) and made dense int32, for `op`'s kernel to read in place;
// `rows_name` names `rows` in the error.
mx::array target_indices(
    const mx::array& targets,
    const mx::array& rows,
    const std::string& op,
    const std::string& rows_name,
    mx::Stream s);

// (softmax(logits) - onehot(targets)) * g, the gradient of <g, cross_entropy(logits,
// targets)> with respect to the logits, fused (CrossEntropyGrad below); targets are
// target_indices' dense int32 ones.
mx::array cross_entropy_grad(
    const mx::array& logits,
    const mx::array& targets,
    const mx::array& g,
    mx::Stream s);

class CrossEntropy : public mx::Primitive {
 public:
  explicit CrossEntropy(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftCrossEntropy";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

// The gradient of <g, cross_entropy(logits, targets)> with respect to the logits,
// (softmax(logits) - onehot(targets)) * g, in one pass: inputs {logits, targets,
// g}. It takes over the logits' buffer when nothing else needs them, so the
// backward pass of a language model's loss holds one (rows, V) array, not three.
// Its own derivatives (second order) are written with MLX ops.
class CrossEntropyGrad : public mx::Primitive {
 public:
  explicit CrossEntropyGrad(mx::Stream stream) : mx::Primitive(stream) {}

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
    return "MetapeftCrossEntropyGrad";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace metapeft
