// The BLAS of the host kernels (host_blas.h): loaded from numpy's bundled OpenBLAS by dsj_host_init.
#include "host_blas.h"

#include <dlfcn.h>

namespace dsj {
SgemmFn g_sgemm = nullptr;
SetThreadsFn g_set_threads_local = nullptr;
}  // namespace dsj

extern "C" int dsj_host_init(const char* library, const char* sgemm, const char* set_threads_local) {
  void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return 1;
  auto gemm = reinterpret_cast<dsj::SgemmFn>(dlsym(handle, sgemm));
  auto threads = reinterpret_cast<dsj::SetThreadsFn>(dlsym(handle, set_threads_local));
  if (gemm == nullptr || threads == nullptr) return 2;
  dsj::g_sgemm = gemm;
  dsj::g_set_threads_local = threads;
  return 0;
}
