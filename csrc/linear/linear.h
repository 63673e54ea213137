// linear(x, weight, bias) = x @ weight.T + bias, with one weight or one per task.
#pragma once

#include <optional>

#include "common.h"

namespace metapeft {

mx::array linear(
    const mx::array& x,
    const mx::array& weight,
    const std::optional<mx::array>& bias = std::nullopt,
    mx::StreamOrDevice s = {});

// x @ w (+ bias): w (d_in, d_out) with x (..., d_in), or w (T, d_in, d_out) with
// x (T, ..., d_in); bias as for linear. The input gradient of a linear map,
// without a transposed view.
mx::array linear_plain(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& bias = std::nullopt,
    mx::StreamOrDevice s = {});

// sum over rows of a^T @ b: a (..., m), b (..., n) -> (m, n); with `per_task`,
// a (T, ..., m), b (T, ..., n) -> (T, m, n). The weight gradient of a linear map.
mx::array outer_sum(
    const mx::array& a,
    const mx::array& b,
    bool per_task,
    mx::StreamOrDevice s = {});

// {outer_sum(a, b, per_task), the sum over rows of a}: a linear map's weight and
// bias gradients from one node.
std::vector<mx::array> outer_sum_and_rows(
    const mx::array& a,
    const mx::array& b,
    bool per_task,
    mx::StreamOrDevice s = {});

// Sums `g` (shape (..., n), or (T, ..., n) with `per_task`) down to a bias shape.
mx::array bias_grad(const mx::array& g, bool per_task, mx::StreamOrDevice s = {});

// Reshapes a bias of shape (T, n) to broadcast against an array of `ndim` dims.
mx::array expand_bias(const mx::array& bias, int ndim, mx::StreamOrDevice s = {});

// x @ w^T (+ bias) in `dtype` with MLX's own matmul (its tuned kernels on a GPU):
// w (d_out, d_in) with x (..., d_in), or w (T, d_out, d_in) with x (T, ..., d_in).
mx::array matmul_affine(
    const mx::array& x,
    const mx::array& w,
    const std::optional<mx::array>& bias,
    mx::Dtype dtype,
    mx::Stream s);

// One primitive for the three products of a linear map and its gradients, so
// that they need no transposed or reshaped views (each a graph node of its own).
class Linear : public mx::Primitive {
 public:
  enum class Form {
    Affine, // x @ w^T (+ bias)
    Plain, // x @ w (+ bias)
    Outer, // sum over rows of a^T @ b (and, with row_sums, of a)
    OuterPerTask, // the same, one per task
  };

  explicit Linear(mx::Stream stream, Form form = Form::Affine, bool row_sums = false)
      : mx::Primitive(stream), form_(form), row_sums_(row_sums) {}

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
    return "MetapeftLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Linear&>(other);
    return form_ == o.form_ && row_sums_ == o.row_sums_;
  }

 private:
  bool outer() const {
    return form_ == Form::Outer || form_ == Form::OuterPerTask;
  }

  Form form_;
  bool row_sums_;
};

} // namespace metapeft

namespace metapeft {

// CPU evaluation shared by Linear and LoraLinear: out = x @ w^T + bias, plus
// scale * (x @ lora_a) @ lora_b when `lora`. `inputs` is {x, w, [lora_a,
// lora_b], [bias]} as the ops build it.
void eval_affine_cpu(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    mx::array& out,
    bool lora,
    float scale);

} // namespace metapeft
