// One BLAS shim: Accelerate on Apple; elsewhere OpenBLAS (scipy-openblas32 wheel),
// or Intel MKL's sgemm when metapeft selects it at import (use_mkl).
#pragma once

#include <cstdint>

#ifdef __APPLE__
#include <Accelerate/Accelerate.h>
#else
#include <cblas.h>

#include <atomic>
#endif

namespace metapeft::blas {

// Products below this many multiply-adds run on one thread: OpenBLAS would split
// them across all cores, and the hand-off costs more than it saves (much more
// when other processes keep the cores busy: a waiting worker is descheduled).
constexpr double kParallelMacs = 1 << 24;

#ifndef __APPLE__
// MKL's cblas_sgemm (LP64, enums as ints), once use_mkl has loaded it; MKL then
// runs sequentially and the kernels share its products out among their own
// worker threads (one pool of threads for every kernel, no OpenMP runtime).
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                         int, float, float*, int);
inline std::atomic<SgemmFn> mkl_sgemm{nullptr};

// Loads MKL from the shared library at `path` (libmkl_rt), sequential; returns
// false and changes nothing when it cannot be loaded.
bool use_mkl(const char* path);
#endif

// True when each product runs on one thread (MKL): the caller shares large ones out.
inline bool sequential() {
#ifdef __APPLE__
  return false;
#else
  return mkl_sgemm.load(std::memory_order_relaxed) != nullptr;
#endif
}

// Row-major C = alpha * op(A) @ op(B) + beta * C, with op(X) = X or X^T. With
// OpenBLAS, products below kParallelMacs run on one of its threads, larger ones on
// all of them; its thread count is process-wide, so it changes only while no other
// product runs (one from another stream waits for it).
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
    int ldc);

// sgemm, with a large product on a sequential BLAS shared out among the worker
// threads: one call per thread on a block of C's columns (or of its rows, when C
// has more rows than columns).
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
    int ldc);

} // namespace metapeft::blas
