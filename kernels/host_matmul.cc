// A dense float32 product on the host (CPU) as an XLA FFI custom call: see kernels/host_matmul.py.
//
// C [M, N] = op(A) op(B) (op: as stored or transposed, row-major) as single-threaded BLAS sgemm calls
// (host_blas.h) on blocks of C's rows or columns (whichever dimension is longer), one block per thread of
// XLA's intra-op pool and the calling thread. The BLAS takes a transposed operand as it is stored, so the
// weight gradient x^T dy of a projection runs without a transposed copy of x.
#include <cstdint>

#include "host_blas.h"

namespace ffi = xla::ffi;

namespace {

// Block sizes are multiples of this (whole vector registers of the micro-kernels).
constexpr int64_t kAlign = 16;
// Products under this many multiply-adds run on the calling thread alone.
constexpr int64_t kSerialWork = int64_t{1} << 18;

}  // namespace

static ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                         ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  if (ffi::Error err = dsj::CheckReady(); err.failure()) return err;
  if (a.dimensions().size() != 2 || b.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("host_matmul: operands must be 2-D");
  const int64_t a0 = a.dimensions()[0], a1 = a.dimensions()[1];
  const int64_t b0 = b.dimensions()[0], b1 = b.dimensions()[1];
  const int64_t m = trans_a ? a1 : a0, k = trans_a ? a0 : a1, n = trans_b ? b0 : b1;
  if ((trans_b ? b1 : b0) != k) return ffi::Error::InvalidArgument("host_matmul: contracting dims differ");
  const float *A = a.typed_data(), *B = b.typed_data();
  float* C = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    for (int64_t i = 0; i < m * n; ++i) C[i] = 0.f;
    return ffi::Error::Success();
  }
  const int64_t workers = std::min<int64_t>(static_cast<int64_t>(pool.num_threads()) + 1, dsj::Cpus());
  const bool by_rows = m >= n;
  const int64_t len = by_rows ? m : n;
  int64_t blocks = m * n * k < kSerialWork ? 1 : std::min(workers, (len + kAlign - 1) / kAlign);
  const int64_t step = ((len + blocks - 1) / blocks + kAlign - 1) / kAlign * kAlign;
  blocks = (len + step - 1) / step;
  dsj::Parallel(pool, blocks, [&](int64_t i) {
    const int64_t lo = i * step, size = std::min(step, len - lo);
    if (by_rows) {
      // Rows lo.. of op(A): row lo of A, or column lo of A^T.
      const float* ab = trans_a ? A + lo : A + lo * a1;
      dsj::Gemm(trans_a, trans_b, size, n, k, ab, a1, B, b1, 0.f, C + lo * n, n);
    } else {
      // Columns lo.. of op(B): column lo of B, or row lo of B^T.
      const float* bb = trans_b ? B + lo * b1 : B + lo;
      dsj::Gemm(trans_a, trans_b, m, size, k, A, a1, bb, b1, 0.f, C + lo, n);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsj_host_matmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // a [M, K], or [K, M] with trans_a
                                  .Arg<ffi::Buffer<ffi::F32>>()   // b [K, N], or [N, K] with trans_b
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c [M, N]
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
