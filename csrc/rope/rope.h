// rope(x, dims, traditional, base, scale, offset, freqs): rotary position
// embeddings, as mx.fast.rope with an integer offset, on the worker threads.
#pragma once

#include <optional>

#include "common.h"

namespace metapeft {

// x (..., L, D): position offset + l of axis -2 rotates the first `dims`
// features by angles (offset + l) * scale / period_i, period_i = base^(2i/dims)
// or freqs[i]; the other features pass through. `traditional` pairs features
// (2i, 2i + 1), else (i, i + dims / 2). With `inverse` the rotation is undone
// (the transpose: rope's own vjp). The result has x's dtype.
mx::array rope(
    const mx::array& x,
    int dims,
    bool traditional,
    std::optional<float> base,
    float scale,
    int offset,
    const std::optional<mx::array>& freqs,
    bool inverse = false,
    mx::StreamOrDevice s = {});

class RoPE : public mx::Primitive {
 public:
  RoPE(mx::Stream stream, int dims, bool traditional, float base, float scale, int offset, bool inverse)
      : mx::Primitive(stream),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale),
        offset_(offset),
        inverse_(inverse) {}

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
    return "MetapeftRoPE";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const RoPE&>(other);
    return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
        scale_ == o.scale_ && offset_ == o.offset_ && inverse_ == o.inverse_;
  }

 private:
  const int dims_;
  const bool traditional_;
  const float base_; // unused (0) when the periods come as an input
  const float scale_;
  const int offset_;
  const bool inverse_;
};

} // namespace metapeft
