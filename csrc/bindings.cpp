// The nanobind module metapeft._ext. Docstrings live in metapeft/ops.py.
#include <cmath>
#include <sstream>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "blas.h"
#include "workers.h"
#include "cross_entropy/cross_entropy.h"
#include "linear_cross_entropy/linear_cross_entropy.h"
#include "linear/linear.h"
#include "lora_linear/lora_linear.h"
#include "reptile_update/reptile_update.h"
#include "rms_norm/rms_norm.h"
#include "rope/rope.h"
#include "sigmoid/sigmoid.h"
#include "softmax/softmax.h"
#include "swiglu/swiglu.h"
#include "squared_distance/squared_distance.h"
#include "task_sgd/task_sgd.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Parameter trees (dicts, lists and tuples of arrays, as mlx.utils treats them),
// walked here because the same walk in Python costs more than a fused update of
// a small network. A structure mismatch raises a short ValueError; metapeft.ops
// then explains it with the leaves' paths.

bool is_container(nb::handle t) {
  return nb::isinstance<nb::dict>(t) || nb::isinstance<nb::list>(t) ||
      nb::isinstance<nb::tuple>(t);
}

mx::array leaf(nb::handle value) {
  if (!nb::isinstance<mx::array>(value)) {
    throw metapeft::DtypeError(
        "tree leaves must be mx.array, got " + std::string(nb::type_name(value.type()).c_str()));
  }
  return nb::cast<mx::array>(value);
}

void flatten(nb::handle tree, std::vector<mx::array>& leaves) {
  if (nb::isinstance<nb::dict>(tree)) {
    for (auto [key, value] : nb::borrow<nb::dict>(tree)) {
      flatten(value, leaves);
    }
  } else if (is_container(tree)) {
    for (nb::handle value : tree) {
      flatten(value, leaves);
    }
  } else {
    leaves.push_back(leaf(tree));
  }
}

// Leaves of `other` in the order of `tree`; false when the structures differ.
bool flatten_like(nb::handle tree, nb::handle other, std::vector<mx::array>& leaves) {
  if (nb::isinstance<nb::dict>(tree)) {
    if (!nb::isinstance<nb::dict>(other) || nb::len(other) != nb::len(tree)) {
      return false;
    }
    auto other_dict = nb::borrow<nb::dict>(other);
    for (auto [key, value] : nb::borrow<nb::dict>(tree)) {
      if (!other_dict.contains(key) || !flatten_like(value, other_dict[key], leaves)) {
        return false;
      }
    }
    return true;
  }
  if (is_container(tree)) {
    if (!(nb::isinstance<nb::list>(other) || nb::isinstance<nb::tuple>(other)) ||
        nb::len(other) != nb::len(tree)) {
      return false;
    }
    for (size_t i = 0; i < nb::len(tree); ++i) {
      if (!flatten_like(tree[i], other[i], leaves)) {
        return false;
      }
    }
    return true;
  }
  if (is_container(other)) {
    return false;
  }
  leaves.push_back(leaf(other));
  return true;
}

std::vector<mx::array> leaves_like(nb::handle tree, nb::handle other, const char* name) {
  std::vector<mx::array> leaves;
  if (!flatten_like(tree, other, leaves)) {
    throw std::invalid_argument(
        std::string(name) + " must have the same tree structure as params");
  }
  return leaves;
}

nb::object rebuild(nb::handle tree, const std::vector<mx::array>& leaves, size_t& next) {
  if (nb::isinstance<nb::dict>(tree)) {
    nb::dict out;
    for (auto [key, value] : nb::borrow<nb::dict>(tree)) {
      out[key] = rebuild(value, leaves, next);
    }
    return out;
  }
  if (is_container(tree)) {
    nb::list out;
    for (nb::handle value : tree) {
      out.append(rebuild(value, leaves, next));
    }
    return nb::isinstance<nb::tuple>(tree) ? nb::object(nb::tuple(out)) : nb::object(out);
  }
  return nb::cast(leaves[next++]);
}

nb::object rebuild(nb::handle tree, const std::vector<mx::array>& leaves) {
  size_t next = 0;
  return rebuild(tree, leaves, next);
}

// A Python float or int as a float32 scalar (made here: cheaper than mx.array()
// from Python). metapeft.ops has already checked that it is a finite number.
bool is_number(nb::handle v) {
  return PyFloat_Check(v.ptr()) || (PyLong_Check(v.ptr()) && !PyBool_Check(v.ptr()));
}

mx::array scalar(nb::handle v, const char* name) {
  double value = nb::cast<double>(v);
  if (!std::isfinite(static_cast<float>(value))) {
    std::ostringstream msg;
    msg << name << " must be finite in float32, got " << value;
    throw std::invalid_argument(msg.str());
  }
  return mx::array(static_cast<float>(value), mx::float32);
}

// `lr` as one array for every leaf, or a tree like `params`.
std::vector<mx::array> per_leaf(nb::handle params, nb::handle lr, size_t n) {
  if (is_number(lr)) {
    return std::vector<mx::array>(n, scalar(lr, "lr"));
  }
  if (nb::isinstance<mx::array>(lr)) {
    return std::vector<mx::array>(n, nb::cast<mx::array>(lr));
  }
  return leaves_like(params, lr, "lr");
}

nb::object task_sgd_tree(
    nb::handle params,
    nb::handle grads,
    nb::handle lr,
    mx::StreamOrDevice s) {
  std::vector<mx::array> p;
  flatten(params, p);
  auto g = leaves_like(params, grads, "grads");
  return rebuild(params, metapeft::task_sgd(p, g, per_leaf(params, lr, p.size()), s));
}

nb::object reptile_update_tree(
    nb::handle params,
    nb::handle adapted,
    nb::handle epsilon,
    mx::StreamOrDevice s) {
  std::vector<mx::array> p;
  flatten(params, p);
  auto a = leaves_like(params, adapted, "adapted");
  auto eps = is_number(epsilon) ? scalar(epsilon, "epsilon") : nb::cast<mx::array>(epsilon);
  return rebuild(params, metapeft::reptile_update(p, a, eps, s));
}

mx::array squared_distance_tree(nb::handle params, nb::handle other, mx::StreamOrDevice s) {
  std::vector<mx::array> p;
  flatten(params, p);
  return metapeft::squared_distance(p, leaves_like(params, other, "other"), s);
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Fused MLX primitives of metapeft (use metapeft.ops)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const metapeft::LeafError& e) {
      // The leaf's index rides along as data: metapeft.ops names the leaf by its path.
      PyObject* type = e.dtype ? PyExc_TypeError : PyExc_ValueError;
      PyObject* error = PyObject_CallFunction(type, "s", e.what());
      if (error != nullptr) {
        PyObject* leaf = PyLong_FromSize_t(e.leaf);
        PyObject_SetAttrString(error, "leaf", leaf);
        Py_XDECREF(leaf);
        PyErr_SetObject(type, error);
        Py_DECREF(error);
      }
    } catch (const metapeft::DtypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def(
      "linear",
      &metapeft::linear,
      "x"_a,
      "weight"_a,
      "bias"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "lora_linear",
      &metapeft::lora_linear,
      "x"_a,
      "weight"_a,
      "lora_a"_a,
      "lora_b"_a,
      "scale"_a,
      "bias"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "task_sgd",
      &task_sgd_tree,
      "params"_a,
      "grads"_a,
      "lr"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "reptile_update",
      &reptile_update_tree,
      "params"_a,
      "adapted"_a,
      "epsilon"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "squared_distance",
      &squared_distance_tree,
      "params"_a,
      "other"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "softmax",
      &metapeft::softmax,
      "x"_a,
      "scale"_a = 1.0f,
      "causal"_a = false,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "cross_entropy",
      &metapeft::cross_entropy,
      "logits"_a,
      "targets"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "linear_cross_entropy",
      &metapeft::linear_cross_entropy,
      "x"_a,
      "weight"_a,
      "targets"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def("sigmoid", &metapeft::sigmoid, "x"_a, nb::kw_only(), "stream"_a = nb::none());

#ifndef __APPLE__
  m.def("use_mkl", [](const std::string& path) { return metapeft::blas::use_mkl(path.c_str()); });
#endif
  m.def("blas_name", []() {
#ifdef __APPLE__
    return std::string("Accelerate");
#else
    return std::string(metapeft::blas::sequential() ? "MKL" : "OpenBLAS");
#endif
  });

  m.def("swiglu", &metapeft::swiglu, "gate"_a, "up"_a, nb::kw_only(), "stream"_a = nb::none());

  m.def("cpu_threads", &metapeft::cpu_threads);

  m.def(
      "rms_norm",
      &metapeft::rms_norm,
      "x"_a,
      "weight"_a,
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "rope",
      &metapeft::rope,
      "x"_a,
      "dims"_a,
      nb::kw_only(),
      "traditional"_a,
      "base"_a,
      "scale"_a,
      "offset"_a,
      "freqs"_a = nb::none(),
      "inverse"_a = false,
      "stream"_a = nb::none());
}
