// Helpers shared by the primitives: validation, dtype dispatch and the
// float32 views that the CPU kernels hand to BLAS.
#pragma once

#include <algorithm>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

// Hot elementwise loops are compiled for several x86 vector widths and the
// best one is picked at load time, so one wheel runs everywhere.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define METAPEFT_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define METAPEFT_SIMD_CLONES
#endif

// Before an elementwise loop whose output may be one of its inputs (an in-place
// update through buffer donation): each iteration touches only its own index,
// so the loop may be vectorised even then, which the compiler cannot prove.
#if defined(__clang__)
#define METAPEFT_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define METAPEFT_IVDEP _Pragma("GCC ivdep")
#else
#define METAPEFT_IVDEP
#endif

namespace metapeft {

// A dtype the primitives do not support; the bindings raise it as TypeError.
struct DtypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// A problem with leaf `leaf` of the tree arguments, named in the message as
// leaf_name() writes it ("params[3]"). The bindings raise it as TypeError (a
// dtype) or ValueError with the index as the exception's `leaf` attribute, so
// that Python can name the leaf by its path in the tree.
struct LeafError : std::invalid_argument {
  LeafError(const std::string& message, size_t leaf, bool dtype = false)
      : std::invalid_argument(message), leaf(leaf), dtype(dtype) {}
  size_t leaf;
  bool dtype;
};

std::string shape_str(const mx::Shape& shape);

// "name[index]": how errors name leaf `index` of a tree argument.
std::string leaf_name(const char* name, size_t index);

// Throws DtypeError unless `a` is float32, float16 or bfloat16. With an
// `index`, `a` is that leaf of the tree argument `name`.
void check_float(const mx::array& a, const char* op, const char* name, int index = -1);

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

// operand() of an input read through dense_float() alone: a float32
// row-contiguous array, read in place, keeps no shape or strides.
Operand elementwise_operand(const mx::array& a);

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

// Where a kernel writes `n` float32 results for an output of `dtype` at `ptr`:
// the output itself when it is float32, else `scratch`, which
// store_float_output then converts into the output.
float* float_output(void* ptr, mx::Dtype dtype, int64_t n, std::vector<float>& scratch);
void store_float_output(const std::vector<float>& scratch, void* ptr, mx::Dtype dtype);

// Lets `out` take over `in`'s buffer (an in-place update) when MLX allows it,
// else allocates it. For the CPU and Metal kernels alike.
void donate_or_allocate(const mx::array& in, mx::array& out);

// The strides that read `a` at each index of an `ndim`-dimensional shape it
// broadcasts to (numpy rules: shapes right-aligned, stride 0 on a missing or
// size-1 axis). For the CPU and Metal kernels alike.
mx::Strides broadcast_strides(const mx::array& a, int ndim);

// MLX gives every output of a primitive its own copy of all the inputs and of
// its siblings, so one primitive over n leaves costs O(n^2) to build, evaluate
// and free: 20 ms for a task_sgd over 512 small leaves. The tree updates
// therefore build one primitive per group of at most this many leaves.
constexpr size_t kLeavesPerPrimitive = 16;

// The outputs of a per-leaf update with the given output shapes and dtypes: one
// primitive from make_primitive() per group of at most kLeavesPerPrimitive
// leaves, whose inputs are the group's leaves of each list in `per_leaf`, in
// order, then `shared`.
std::vector<mx::array> leaf_group_outputs(
    const std::vector<mx::Shape>& shapes,
    const std::vector<mx::Dtype>& dtypes,
    std::initializer_list<const std::vector<mx::array>*> per_leaf,
    const std::vector<mx::array>& shared,
    const std::function<std::shared_ptr<mx::Primitive>()>& make_primitive);

// The shapes of inputs[0 .. n), as the outputs of a per-leaf update.
std::vector<mx::Shape> leaf_shapes(const std::vector<mx::array>& inputs, size_t n);

// Assembles jvp outputs: each summed tangent broadcast to its output,
// or zeros where no input tangent reached it.
std::vector<mx::array> leaf_tangents(
    const std::vector<std::optional<mx::array>>& sums,
    const std::vector<mx::Shape>& shapes,
    const std::vector<mx::Dtype>& dtypes,
    mx::StreamOrDevice s);

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

// A float32 view of one leaf's data: the array's own storage when it is dense
// float32, else a dense copy in `scratch`.
const float* dense_float(const Operand& op, std::vector<float>& scratch);

// Reads a scalar operand as float.
float scalar_float(const Operand& op);

// mx::sum over `axes`, or zeros of the reduced shape when `a` is empty: MLX
// 0.32.4's CPU reduction of an empty array can hang.
mx::array sum_axes(const mx::array& a, const std::vector<int>& axes, bool keepdims, mx::StreamOrDevice s);

// Sums `a` down to `shape`, which broadcasts to a.shape() (numpy rules).
mx::array sum_to_shape(const mx::array& a, const mx::Shape& shape, mx::StreamOrDevice s);

// True when an array of shape `from` broadcasts to `to` without changing `to`.
bool broadcasts_to(const mx::Shape& from, const mx::Shape& to);

// True when `a` is known to be all zeros without evaluating it: a scalar zero
// broadcast (mx::zeros_like), as MLX's vjp passes for an output of a primitive
// that nothing depended on. False when unsure.
bool is_zero_fill(const mx::array& a);

// Directory of the loaded extension (where the metallib is installed).
std::string binary_dir();

} // namespace metapeft
