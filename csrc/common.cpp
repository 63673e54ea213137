#include "common.h"

#include <dlfcn.h>

#include <filesystem>
#include <limits>
#include <sstream>
#include <string_view>

namespace metapeft {

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << (i ? ", " : "") << shape[i];
  }
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

std::string leaf_name(const char* name, size_t index) {
  return std::string(name) + "[" + std::to_string(index) + "]";
}

void check_float(const mx::array& a, const char* op, const char* name, int index) {
  auto d = a.dtype();
  if (d != mx::float32 && d != mx::float16 && d != mx::bfloat16) {
    std::ostringstream os;
    os << "[metapeft." << op << "] " << (index < 0 ? std::string(name) : leaf_name(name, index))
       << " must be float32, float16 or bfloat16, got " << d;
    if (index >= 0) {
      throw LeafError(os.str(), index, true);
    }
    throw DtypeError(os.str());
  }
}

mx::Dtype result_dtype(const std::vector<mx::array>& arrays) {
  mx::Dtype d = arrays.at(0).dtype();
  for (auto& a : arrays) {
    d = mx::promote_types(d, a.dtype());
  }
  return d;
}

mx::array to_front(const mx::array& a, int axis, int size, mx::StreamOrDevice s) {
  if (axis >= 0) {
    return mx::moveaxis(a, axis, 0, s);
  }
  auto shape = a.shape();
  shape.insert(shape.begin(), size);
  return mx::broadcast_to(a, shape, s);
}

mx::array fold_tasks(
    const mx::array& a,
    int axis,
    int V,
    int T,
    bool has_task_axis,
    mx::StreamOrDevice s) {
  mx::array b = a;
  if (has_task_axis) {
    b = to_front(a, axis, V, s);
  } else if (axis >= 0) {
    b = mx::expand_dims(mx::moveaxis(a, axis, 0, s), 1, s);
    auto shape = b.shape();
    shape[1] = T;
    b = mx::broadcast_to(b, shape, s);
  } else {
    return a;
  }
  auto shape = b.shape();
  shape.erase(shape.begin());
  shape[0] = V * T;
  return mx::reshape(b, shape, s);
}

mx::array unfold_tasks(const mx::array& a, int V, mx::StreamOrDevice s) {
  auto shape = a.shape();
  shape[0] /= V;
  shape.insert(shape.begin(), V);
  return mx::reshape(a, shape, s);
}

int vmap_size(const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) {
      return inputs[i].shape(axes[i]);
    }
  }
  throw std::invalid_argument("[metapeft] vmap called with no mapped input");
}

int64_t prod(const mx::Shape& shape, int begin, int end) {
  int64_t p = 1;
  for (int i = begin; i < end; ++i) {
    p *= shape[i];
  }
  return p;
}

Operand operand(const mx::array& a) {
  return {a.data<void>(), a.dtype(), a.shape(), a.strides(), a.flags().row_contiguous};
}

Operand elementwise_operand(const mx::array& a) {
  if (a.dtype() == mx::float32 && a.flags().row_contiguous) {
    return {a.data<void>(), a.dtype(), {}, {}, true};
  }
  return operand(a);
}

namespace {

template <typename T>
void gather_typed(
    const T* src,
    const mx::Shape& shape,
    const mx::Strides& strides,
    float* dst) {
  int nd = shape.size();
  int64_t n = 1;
  for (auto d : shape) {
    n *= d;
  }
  if (n == 0) {
    return;
  }
  if (nd == 0) {
    dst[0] = static_cast<float>(src[0]);
    return;
  }
  int64_t inner = shape[nd - 1];
  int64_t inner_stride = strides[nd - 1];
  std::vector<int64_t> idx(nd, 0);
  int64_t offset = 0;
  for (int64_t done = 0; done < n; done += inner) {
    const T* row = src + offset;
    if (inner_stride == 1) {
      for (int64_t j = 0; j < inner; ++j) {
        dst[j] = static_cast<float>(row[j]);
      }
    } else {
      for (int64_t j = 0; j < inner; ++j) {
        dst[j] = static_cast<float>(row[j * inner_stride]);
      }
    }
    dst += inner;
    for (int ax = nd - 2; ax >= 0; --ax) {
      offset += strides[ax];
      if (++idx[ax] < shape[ax]) {
        break;
      }
      offset -= strides[ax] * shape[ax];
      idx[ax] = 0;
    }
  }
}

template <typename T>
void store_typed(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<T>(src[i]);
  }
}

} // namespace

void gather_float(
    const void* src,
    mx::Dtype dtype,
    const mx::Shape& shape,
    const mx::Strides& strides,
    float* dst) {
  if (dtype == mx::float32) {
    gather_typed(static_cast<const float*>(src), shape, strides, dst);
  } else if (dtype == mx::float16) {
    gather_typed(static_cast<const mx::float16_t*>(src), shape, strides, dst);
  } else if (dtype == mx::bfloat16) {
    gather_typed(static_cast<const mx::bfloat16_t*>(src), shape, strides, dst);
  } else {
    throw std::runtime_error("[metapeft] unsupported dtype reached a kernel");
  }
}

void store_float(const float* src, void* dst, mx::Dtype dtype, int64_t n) {
  if (dtype == mx::float32) {
    std::copy(src, src + n, static_cast<float*>(dst));
  } else if (dtype == mx::float16) {
    store_typed(src, static_cast<mx::float16_t*>(dst), n);
  } else if (dtype == mx::bfloat16) {
    store_typed(src, static_cast<mx::bfloat16_t*>(dst), n);
  } else {
    throw std::runtime_error("[metapeft] unsupported dtype reached a kernel");
  }
}

float* float_output(void* ptr, mx::Dtype dtype, int64_t n, std::vector<float>& scratch) {
  if (dtype == mx::float32) {
    return static_cast<float*>(ptr);
  }
  scratch.resize(n);
  return scratch.data();
}

void store_float_output(const std::vector<float>& scratch, void* ptr, mx::Dtype dtype) {
  if (dtype != mx::float32) {
    store_float(scratch.data(), ptr, dtype, scratch.size());
  }
}

void donate_or_allocate(const mx::array& in, mx::array& out) {
  if (in.size() > 0 && in.is_donatable() && in.flags().row_contiguous && in.dtype() == out.dtype() &&
      in.data_size() == in.size()) {
    out.copy_shared_buffer(in);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

mx::Strides broadcast_strides(const mx::array& a, int ndim) {
  mx::Strides strides(ndim, 0);
  int extra = ndim - static_cast<int>(a.ndim());
  for (int ax = 0; ax < static_cast<int>(a.ndim()); ++ax) {
    if (a.shape(ax) != 1) {
      strides[ax + extra] = a.strides()[ax];
    }
  }
  return strides;
}

std::vector<mx::array> leaf_group_outputs(
    const std::vector<mx::Shape>& shapes,
    const std::vector<mx::Dtype>& dtypes,
    std::initializer_list<const std::vector<mx::array>*> per_leaf,
    const std::vector<mx::array>& shared,
    const std::function<std::shared_ptr<mx::Primitive>()>& make_primitive) {
  size_t n = shapes.size();
  std::vector<mx::array> outputs;
  outputs.reserve(n);
  for (size_t begin = 0; begin < n; begin += kLeavesPerPrimitive) {
    size_t end = std::min(n, begin + kLeavesPerPrimitive);
    std::vector<mx::array> inputs;
    for (auto* leaves : per_leaf) {
      inputs.insert(inputs.end(), leaves->begin() + begin, leaves->begin() + end);
    }
    inputs.insert(inputs.end(), shared.begin(), shared.end());
    auto group = mx::array::make_arrays(
        {shapes.begin() + begin, shapes.begin() + end},
        {dtypes.begin() + begin, dtypes.begin() + end},
        make_primitive(),
        inputs);
    outputs.insert(outputs.end(), group.begin(), group.end());
  }
  return outputs;
}

std::vector<mx::Shape> leaf_shapes(const std::vector<mx::array>& inputs, size_t n) {
  std::vector<mx::Shape> shapes;
  for (size_t i = 0; i < n; ++i) {
    shapes.push_back(inputs[i].shape());
  }
  return shapes;
}

std::vector<mx::array> leaf_tangents(
    const std::vector<std::optional<mx::array>>& sums,
    const std::vector<mx::Shape>& shapes,
    const std::vector<mx::Dtype>& dtypes,
    mx::StreamOrDevice s) {
  std::vector<mx::array> out;
  for (size_t i = 0; i < sums.size(); ++i) {
    out.push_back(
        sums[i] ? mx::astype(mx::broadcast_to(*sums[i], shapes[i], s), dtypes[i], s)
                : mx::zeros(shapes[i], dtypes[i], s));
  }
  return out;
}

Mat as_mat(const Operand& op, bool batched, std::vector<float>& scratch) {
  int nd = op.shape.size();
  int first = batched ? 1 : 0;
  int64_t batch = batched ? op.shape[0] : 1;
  int64_t rows = prod(op.shape, first, nd - 1);
  int64_t cols = nd > first ? op.shape[nd - 1] : 1;
  if (op.dtype == mx::float32) {
    // Collapse the row axes into one stride, ignoring axes of size 1.
    int64_t row_stride = -1;
    bool collapsible = true;
    int64_t expected = -1;
    for (int ax = nd - 2; ax >= first; --ax) {
      if (op.shape[ax] == 1) {
        continue;
      }
      if (row_stride < 0) {
        row_stride = op.strides[ax];
      } else if (op.strides[ax] != expected) {
        collapsible = false;
      }
      expected = op.strides[ax] * op.shape[ax];
    }
    int64_t col_stride = cols > 1 ? op.strides[nd - 1] : 1;
    int64_t batch_stride = batch > 1 ? op.strides[0] : 0;
    bool row_major = (cols <= 1 || col_stride == 1) &&
        (rows <= 1 || row_stride >= std::max<int64_t>(cols, 1));
    bool col_major = (rows <= 1 || row_stride == 1) &&
        (cols <= 1 || col_stride >= std::max<int64_t>(rows, 1));
    // BLAS takes 32-bit leading dimensions.
    bool fits = std::max(row_stride, col_stride) <= std::numeric_limits<int>::max();
    if (collapsible && fits && batch_stride >= 0 && (row_major || col_major)) {
      auto data = static_cast<const float*>(op.ptr);
      if (row_major) {
        int ld = rows > 1 ? row_stride : std::max<int64_t>(cols, 1);
        return {data, batch_stride, ld, false};
      }
      int ld = cols > 1 ? col_stride : std::max<int64_t>(rows, 1);
      return {data, batch_stride, ld, true};
    }
  }
  scratch.resize(batch * rows * cols);
  gather_float(op.ptr, op.dtype, op.shape, op.strides, scratch.data());
  int64_t stride = batch > 1 ? rows * cols : 0;
  return {scratch.data(), stride, static_cast<int>(std::max<int64_t>(cols, 1)), false};
}

const float* dense_float(const Operand& op, std::vector<float>& scratch) {
  if (op.dtype == mx::float32 && op.row_contiguous) {
    return static_cast<const float*>(op.ptr);
  }
  scratch.resize(prod(op.shape, 0, op.shape.size()));
  gather_float(op.ptr, op.dtype, op.shape, op.strides, scratch.data());
  return scratch.data();
}

float scalar_float(const Operand& op) {
  float v;
  gather_float(op.ptr, op.dtype, {}, {}, &v);
  return v;
}

mx::array sum_axes(
    const mx::array& a,
    const std::vector<int>& axes,
    bool keepdims,
    mx::StreamOrDevice s) {
  if (a.size() > 0) {
    return mx::sum(a, axes, keepdims, s);
  }
  auto shape = a.shape();
  for (int ax : axes) {
    shape[ax] = keepdims ? 1 : -1;
  }
  mx::Shape out;
  for (int d : shape) {
    if (d >= 0) {
      out.push_back(d);
    }
  }
  return mx::zeros(out, a.dtype(), s);
}

mx::array sum_to_shape(const mx::array& a, const mx::Shape& shape, mx::StreamOrDevice s) {
  int extra = a.ndim() - shape.size();
  std::vector<int> axes;
  for (int ax = 0; ax < static_cast<int>(a.ndim()); ++ax) {
    if (ax < extra || (shape[ax - extra] == 1 && a.shape(ax) != 1)) {
      axes.push_back(ax);
    }
  }
  auto out = axes.empty() ? a : sum_axes(a, axes, true, s);
  return mx::reshape(out, shape, s);
}

bool broadcasts_to(const mx::Shape& from, const mx::Shape& to) {
  if (from.size() > to.size()) {
    return false;
  }
  int extra = to.size() - from.size();
  for (size_t i = 0; i < from.size(); ++i) {
    if (from[i] != 1 && from[i] != to[i + extra]) {
      return false;
    }
  }
  return true;
}

bool is_zero_fill(const mx::array& a) {
  const mx::array* node = &a;
  while (node->has_primitive()) {
    // By name: libmlx does not export its primitives' type information.
    std::string_view name = node->primitive().name();
    bool passes_value = name == "Full" || name == "Broadcast" || name == "AsType";
    if (!passes_value || node->inputs().size() != 1) {
      return false;
    }
    node = &node->inputs()[0];
  }
  if (!node->is_available() || node->size() != 1) {
    return false;
  }
  auto bytes = node->data<unsigned char>();
  return std::all_of(bytes, bytes + node->itemsize(), [](unsigned char b) { return b == 0; });
}

std::string binary_dir() {
  static std::string dir = []() {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info)) {
      throw std::runtime_error("[metapeft] cannot locate the extension binary");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

} // namespace metapeft
