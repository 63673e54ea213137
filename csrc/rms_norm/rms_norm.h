// rms_norm(x, weight, eps) = x / sqrt(mean(x^2) + eps) * weight over the last
// axis, as mx.fast.rms_norm, with a fused multithreaded backward (RMSNormGrad).
#pragma once

#include "common.h"

namespace metapeft {

// x (..., D), weight (D,); the result has the dtype of promote(x, weight), as
// mx.fast.rms_norm; arithmetic is float32. On a GPU stream it is mx.fast.rms_norm.
mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s = {});

class RMSNorm : public mx::Primitive {
 public:
  RMSNorm(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}

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
    return "MetapeftRMSNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RMSNorm&>(other).eps_;
  }

 private:
  const float eps_;
};

// The gradients (d x, d weight) of <g, rms_norm(x, weight, eps)>: inputs
// {x, weight, g}. With `per_entry`, d weight is summed separately for each
// index of x's first axis (shape (V, D)): the form vmap over x and g takes.
// Its own derivatives (second order) are those of the same maths written with
// MLX ops.
class RMSNormGrad : public mx::Primitive {
 public:
  RMSNormGrad(mx::Stream stream, float eps, bool per_entry = false)
      : mx::Primitive(stream), eps_(eps), per_entry_(per_entry) {}

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
    return "MetapeftRMSNormGrad";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RMSNormGrad&>(other);
    return eps_ == o.eps_ && per_entry_ == o.per_entry_;
  }

 private:
  const float eps_;
  const bool per_entry_;
};

} // namespace metapeft
