// One BLAS shim: Accelerate on Apple, OpenBLAS (scipy-openblas32 wheel) elsewhere.
#pragma once

#ifdef __APPLE__
#include <Accelerate/Accelerate.h>
#define METAPEFT_CBLAS_SGEMM cblas_sgemm
#else
#include <cblas.h>
#define METAPEFT_CBLAS_SGEMM scipy_cblas_sgemm
#endif

namespace metapeft::blas {

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
