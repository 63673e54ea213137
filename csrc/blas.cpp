#include "blas.h"

#ifndef __APPLE__
#include <dlfcn.h>
#endif

namespace metapeft::blas {

#ifndef __APPLE__
bool use_mkl(const char* path) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    return false;
  }
  auto sgemm = reinterpret_cast<SgemmFn>(dlsym(lib, "cblas_sgemm"));
  auto set_layer = reinterpret_cast<int (*)(int)>(dlsym(lib, "MKL_Set_Threading_Layer"));
  if (sgemm == nullptr || set_layer == nullptr) {
    dlclose(lib);
    return false;
  }
  set_layer(1); // MKL_THREADING_SEQUENTIAL
  mkl_sgemm.store(sgemm);
  return true;
}
#endif

} // namespace metapeft::blas
