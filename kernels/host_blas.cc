// The BLAS of the host kernels (host_blas.h): MKL linked in statically where the build found it
// (DSJ_STATIC_MKL), else numpy's bundled OpenBLAS, loaded by dsj_host_init.
#include "host_blas.h"

#include <dlfcn.h>

#if defined(DSJ_STATIC_MKL)
// MKL's ILP64 interface (libmkl_intel_ilp64.a): MKL_INT is 64-bit. Its symbols are local to this library
// (linked with --exclude-libs), so they neither take the place of nor give way to another MKL in the
// process (PyTorch exports the one it links).
extern "C" void cblas_sgemm(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                            const float*, int64_t, float, float*, int64_t);
extern "C" int MKL_Set_Num_Threads_Local(int);
#endif

namespace dsj {
SgemmFn g_sgemm = nullptr;
SetThreadsFn g_set_threads_local = nullptr;
}  // namespace dsj

// 1 when MKL is linked in (then dsj_host_init ignores its arguments).
extern "C" int dsj_host_static_blas() {
#if defined(DSJ_STATIC_MKL)
  return 1;
#else
  return 0;
#endif
}

extern "C" int dsj_host_init(const char* library, const char* sgemm, const char* set_threads_local) {
#if defined(DSJ_STATIC_MKL)
  dsj::g_sgemm = &cblas_sgemm;
  dsj::g_set_threads_local = &MKL_Set_Num_Threads_Local;
  return 0;
#else
  void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return 1;
  auto gemm = reinterpret_cast<dsj::SgemmFn>(dlsym(handle, sgemm));
  auto threads = reinterpret_cast<dsj::SetThreadsFn>(dlsym(handle, set_threads_local));
  if (gemm == nullptr || threads == nullptr) return 2;
  dsj::g_sgemm = gemm;
  dsj::g_set_threads_local = threads;
  return 0;
#endif
}
