// Helpers shared by the primitives: validation, dtype dispatch and the
// float32 views that the CPU kernels hand to BLAS.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace metapeft {

// A dtype the primitives do not support; the bindings raise it as TypeError.
struct DtypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

std::string shape_str(const mx::Shape& shape);

// Throws DtypeError unless `a` is float32, float16 or bfloat16.
void check_float(const mx::array& a, const std::string& op, const std::string& name);

// The dtype of the result of combining `arrays` (all floating).
mx::Dtype result_dtype(const std::vector<mx::array>& arrays);

// Moves the vmapped axis of `a` to the front, or broadcasts an unmapped `a`
// to a new leading axis of size `size`.
mx::array to_front(const mx::array& a, int axis, int size, mx::StreamOrDevice s);

// For vmap over a primitive whose task axis is 0: folds the vmapped axis into
// the task axis, (V, T, ...) -> (V * T, ...). An input without a task axis
// (shared by all tasks) is kept when unmapped, else broadcast over the T tasks.
mx::array fold_tasks(
    const mx::array& a,
    int axis,
    int V,
    int T,
    bool has_task_axis,
    mx::StreamOrDevice s);

// Undoes fold_tasks on an output: (V * T, ...) -> (V, T, ...).
mx::array unfold_tasks(const mx::array& a, int V, mx::StreamOrDevice s);

// Size of the first mapped axis among `inputs`.
int vmap_size(const std::vector<mx::array>& inputs, const std::vector<int>& axes);

// Product of shape[begin:end].
int64_t prod(const mx::Shape& shape, int begin, int end);

// An array's storage as the eval lambdas capture it (by value).
struct Operand {
  const void* ptr;
  mx::Dtype dtype;
  mx::Shape shape;
  mx::Strides strides;
  bool row_contiguous;
};
Operand operand(const mx::array& a);

// Writes `src` (any strides, any supported dtype) densely as float32 into `dst`,
// reading it with the given (possibly broadcast) shape and strides.
void gather_float(
    const void* src,
    mx::Dtype dtype,
    const mx::Shape& shape,
    const mx::Strides& strides,
    float* dst);

// Converts `n` float32 values into `dst` of `dtype`.
void store_float(const float* src, void* dst, mx::Dtype dtype, int64_t n);

// A batch of float32 matrices laid out as BLAS takes them. `trans` means the
// matrix is stored column-major (element (i, j) at i + j * ld).
struct Mat {
  const float* data;
  int64_t batch_stride;
  int ld;
  bool trans;
  const float* at(int64_t b) const {
    return data + b * batch_stride;
  }
};

// Views `op` as a batch of (rows x cols) matrices: the batch is axis 0 when
// `batched`, the rows are the remaining leading axes and the columns the last.
// Uses the storage directly when BLAS can read it, else a float32 copy in `scratch`.
Mat as_mat(const Operand& op, bool batched, std::vector<float>& scratch);

// Directory of the loaded extension (where the metallib is installed).
std::string binary_dir();

} // namespace metapeft
