// The nanobind module metapeft._ext. Docstrings live in metapeft/ops.py.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "linear/linear.h"
#include "lora_linear/lora_linear.h"
#include "reptile_update/reptile_update.h"
#include "task_sgd/task_sgd.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_ext, m) {
  m.doc() = "Fused MLX primitives of metapeft (use metapeft.ops)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
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
      &metapeft::task_sgd,
      "params"_a,
      "grads"_a,
      "lr"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "reptile_update",
      &metapeft::reptile_update,
      "params"_a,
      "adapted"_a,
      "epsilon"_a,
      nb::kw_only(),
      "stream"_a = nb::none());
}
