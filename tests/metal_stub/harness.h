// The kernels of the .metal sources, compiled as C++, by the name each is
// instantiated under; run_kernel calls one over a 1D grid (tests/test_metal_stub.py).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <metal_stdlib>

namespace stub {

// A kernel called with its arguments as pointers to their values, then pos and grid.
using Thunk = std::function<void(void** args, uint2 pos, uint2 grid)>;

inline std::map<std::string, Thunk>& kernels() {
  static std::map<std::string, Thunk> table;
  return table;
}

// Argument `a` (a pointer to the value) as the parameter type T.
template <typename T>
T arg(void* a) {
  if constexpr (std::is_pointer_v<T>) {
    return static_cast<T>(*static_cast<void**>(a));
  } else {
    return *static_cast<std::remove_reference_t<T>*>(a);
  }
}

template <typename... A, size_t... I>
void call(void (*f)(A...), void** args, uint2 pos, uint2 grid, std::index_sequence<I...>) {
  f(arg<std::tuple_element_t<I, std::tuple<A...>>>(args[I])..., pos, grid);
}

template <typename... A>
bool add(const char* name, void (*f)(A...)) {
  kernels()[name] = [f](void** args, uint2 pos, uint2 grid) {
    call(f, args, pos, grid, std::make_index_sequence<sizeof...(A) - 2>{});
  };
  return true;
}

} // namespace stub
