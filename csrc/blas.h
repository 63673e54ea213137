// One BLAS shim: Accelerate on Apple, OpenBLAS (scipy-openblas32 wheel) elsewhere.
#pragma once

#ifdef __APPLE__
#include <Accelerate/Accelerate.h>
#define METAPEFT_CBLAS_SGEMM cblas_sgemm
#else
#include <cblas.h>

#include <atomic>
#define METAPEFT_CBLAS_SGEMM scipy_cblas_sgemm
#endif

namespace metapeft::blas {

// Products below this many multiply-adds run on one thread: OpenBLAS would split
// them across all cores, and the hand-off costs more than it saves (much more
// when other processes keep the cores busy: a waiting worker is descheduled).
constexpr double kParallelMacs = 1 << 24;

#ifndef __APPLE__
// OpenBLAS's own thread count when we started (OPENBLAS_NUM_THREADS or all cores).
inline int max_threads() {
  static const int threads = scipy_openblas_get_num_threads();
  return threads;
}

// Sets OpenBLAS's (process-wide) thread count, calling it only on a change. The
// starting count is read before the first change, whatever size of product comes first.
inline void use_threads(int threads) {
  static std::atomic<int> current{max_threads()};
  if (current.exchange(threads) != threads) {
    scipy_openblas_set_num_threads(threads);
  }
}
#endif

// Row-major C = alpha * op(A) @ op(B) + beta * C, with op(X) = X or X^T.
inline void sgemm(
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
#ifndef __APPLE__
  use_threads(static_cast<double>(m) * n * k < kParallelMacs ? 1 : max_threads());
#endif
  METAPEFT_CBLAS_SGEMM(
      CblasRowMajor,
      trans_a ? CblasTrans : CblasNoTrans,
      trans_b ? CblasTrans : CblasNoTrans,
      m,
      n,
      k,
      alpha,
      a,
      lda,
      b,
      ldb,
      beta,
      c,
      ldc);
}

} // namespace metapeft::blas
