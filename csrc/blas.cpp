#include "blas.h"

#include <algorithm>
#include <condition_variable>
#include <mutex>

#include "workers.h"

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

#ifndef __APPLE__
namespace {

// OpenBLAS's process-wide thread count, and the products running under it.
struct OpenBlasThreads {
  std::mutex mutex;
  std::condition_variable idle;
  int count = scipy_openblas_get_num_threads(); // what it is now
  int all = count;                              // what it was at start
  int running = 0;
};

OpenBlasThreads& openblas_threads() {
  static OpenBlasThreads* threads = new OpenBlasThreads(); // lives until exit
  return *threads;
}

} // namespace
#endif

void sgemm(
    bool trans_a,
    bool trans_b,
    int m,
    int n,
    int k,
    float alpha,
    const float* a,
    int lda,
    const float* b,
    int ldb,
    float beta,
    float* c,
    int ldc) {
  auto ta = trans_a ? CblasTrans : CblasNoTrans;
  auto tb = trans_b ? CblasTrans : CblasNoTrans;
#ifdef __APPLE__
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#else
  if (auto mkl = mkl_sgemm.load(std::memory_order_relaxed)) {
    mkl(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  auto& threads = openblas_threads();
  {
    std::unique_lock<std::mutex> lock(threads.mutex);
    int want = static_cast<double>(m) * n * k < kParallelMacs ? 1 : threads.all;
    threads.idle.wait(lock, [&] { return threads.count == want || threads.running == 0; });
    if (threads.count != want) {
      scipy_openblas_set_num_threads(want);
      threads.count = want;
    }
    ++threads.running;
  }
  scipy_cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  std::lock_guard<std::mutex> lock(threads.mutex);
  if (--threads.running == 0) {
    threads.idle.notify_all();
  }
#endif
}

// Products of at least this many multiply-adds are worth sharing out.
constexpr double kSharedMacs = 1 << 21;

void sgemm_shared(
    bool trans_a,
    bool trans_b,
    int64_t m,
    int64_t n,
    int64_t k,
    float alpha,
    const float* a,
    int lda,
    const float* b,
    int ldb,
    float beta,
    float* c,
    int ldc) {
  int threads = std::min(cpu_threads(), 8);
  bool by_columns = n >= m;
  int64_t extent = by_columns ? n : m;
  if (!sequential() || threads <= 1 || static_cast<double>(m) * n * k < kSharedMacs || extent < 32) {
    sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Blocks of whole 16-wide panels, as the BLAS kernels tile them.
  int64_t step = ((extent + threads - 1) / threads + 15) / 16 * 16;
  int chunks = static_cast<int>((extent + step - 1) / step);
  run_chunks(chunks, [&](int i) {
    int64_t lo = i * step, len = std::min(extent, lo + step) - lo;
    if (by_columns) {
      const float* bl = trans_b ? b + lo * ldb : b + lo;
      sgemm(trans_a, trans_b, m, len, k, alpha, a, lda, bl, ldb, beta, c + lo, ldc);
    } else {
      const float* al = trans_a ? a + lo : a + lo * lda;
      sgemm(trans_a, trans_b, len, n, k, alpha, al, lda, b, ldb, beta, c + lo * ldc, ldc);
    }
  });
}

} // namespace metapeft::blas
