// Shared by the host (CPU) FFI kernels: the BLAS they call, the thread pool loop, scratch buffers.
//
// The BLAS is MKL, linked in statically where the build finds its libraries (kernels/host_build.py), else
// numpy's bundled ILP64 OpenBLAS, loaded by dsj_host_init (host_blas.cc); either is called single-threaded
// from XLA's intra-op pool threads.
#ifndef DEEPSEEK_JAX_KERNELS_HOST_BLAS_H_
#define DEEPSEEK_JAX_KERNELS_HOST_BLAS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace dsj {

namespace ffi = xla::ffi;

// cblas_sgemm of an ILP64 BLAS (64-bit integer arguments).
using SgemmFn = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);
using SetThreadsFn = int (*)(int);
extern SgemmFn g_sgemm;
extern SetThreadsFn g_set_threads_local;

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

// Row-major C = op(A) op(B) + beta C.
inline void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  g_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, m, n, k, 1.f, a, lda, b, ldb, beta,
          c, ldc);
}

// Runs fn(0..n-1) on the calling thread and the pool's threads, each BLAS call single-threaded.
template <typename Fn>
void Parallel(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  if (n <= 0) return;
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  // Helpers may start after the caller has taken every index: they then touch only `state`.
  auto work = [state, n, &fn]() {
    g_set_threads_local(1);
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

// CPUs this process may run on (its affinity mask), at least 1.
inline int64_t Cpus() {
  static const int64_t cpus = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<int64_t>(std::max(1, CPU_COUNT(&set)));
#endif
    return std::max<int64_t>(1, std::thread::hardware_concurrency());
  }();
  return cpus;
}

// v's storage, grown to at least n floats (kept: reused buffers are not page-faulted in again).
inline float* Sized(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

inline ffi::Error CheckReady() {
  if (g_sgemm == nullptr || g_set_threads_local == nullptr)
    return ffi::Error::Internal("host kernels: dsj_host_init has not loaded a BLAS");
  return ffi::Error::Success();
}

}  // namespace dsj

// Elementwise loops in functions of their own (unaliased pointers, so that they vectorize with the vector
// exp of -ffast-math), cloned per x86 ISA.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSJ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSJ_VECTOR_CLONES
#endif

#endif  // DEEPSEEK_JAX_KERNELS_HOST_BLAS_H_
