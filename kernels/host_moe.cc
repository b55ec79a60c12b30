// The routed experts' SwiGLU FFN on the host (CPU) as an XLA FFI custom call: see kernels/host_moe.py.
//
// Rows are the T*K (token, slot) assignments of idx [T, K], sorted by expert inside each call (a stable
// counting sort: the flat assignment index token * K + slot of each sorted row). The work is split into
// tiles of at most `tile` rows of one expert; each tile gathers its token rows, runs its products as
// single-threaded BLAS sgemm calls (host_blas.h) with the activation in between, and writes its output
// rows, scaled by their gate weights, back to their flat assignment positions in a scratch buffer; a second
// pass sums each token's K rows into the output. Tiles go to XLA's intra-op thread pool; the calling thread
// works through them too. The backward takes the output's cotangent per token, computes each row's dx and
// gate-weight gradient per tile (sums of each token's K rows in a second pass), then each expert's weight
// gradients over all its rows.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "host_blas.h"

namespace ffi = xla::ffi;
using dsj::Gemm;
using dsj::Parallel;
using dsj::Sized;

namespace {

struct Tile {
  int64_t expert, row0, rows;
};

struct Layout {
  std::vector<int64_t> order;   // flat assignment (token * K + slot) of each sorted row
  std::vector<int64_t> start;   // first sorted row of each expert, and the routed total at the end
  std::vector<Tile> tiles;
  int64_t total;                 // routed rows; assignments to ids outside [0, E) sort after them, give 0
};

// A stable counting sort of the flat assignments by expert (the order of `jnp.argsort(stable=True)`).
Layout MakeLayout(const int32_t* ids, int64_t rows, int64_t experts, int64_t tile) {
  Layout l;
  l.start.assign(experts + 1, 0);
  for (int64_t r = 0; r < rows; ++r)
    if (ids[r] >= 0 && ids[r] < experts) ++l.start[ids[r] + 1];
  for (int64_t e = 0; e < experts; ++e) l.start[e + 1] += l.start[e];
  l.total = l.start[experts];
  l.order.resize(rows);
  std::vector<int64_t> next(l.start.begin(), l.start.end() - 1);
  int64_t unrouted = l.total;
  for (int64_t r = 0; r < rows; ++r) {
    const bool routed = ids[r] >= 0 && ids[r] < experts;
    l.order[routed ? next[ids[r]]++ : unrouted++] = r;
  }
  for (int64_t e = 0; e < experts; ++e)
    for (int64_t r = l.start[e]; r < l.start[e + 1]; r += tile)
      l.tiles.push_back({e, r, std::min(tile, l.start[e + 1] - r)});
  return l;
}

// dst[i] = src[row_of(i)] for the `rows` rows of width d starting at sorted row r0.
template <typename RowOf>
void GatherRows(float* dst, const float* src, int64_t r0, int64_t rows, int64_t d, RowOf row_of) {
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * d, src + row_of(r0 + i) * d, sizeof(float) * d);
}

// exp of -|v| only, which cannot overflow (the library is built with -ffast-math, which assumes no inf).
inline float Sigmoid(float v) {
  const float e = std::exp(-std::fabs(v)), s = 1.f / (1.f + e);
  return v >= 0.f ? s : e * s;
}

// Scratch of the calls (the backward's sorted copies of x and dy, h, d[gu]; the per-assignment output or
// dx rows of either before their sum over K), kept between calls so that its pages are
// not faulted in again on every call; each concurrent call takes a set of its own.
class ScratchPool {
 public:
  struct Set {
    std::vector<float> xs, dys, h, dgu, rows;
  };
  std::unique_ptr<Set> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<Set>();
    std::unique_ptr<Set> set = std::move(free_.back());
    free_.pop_back();
    return set;
  }
  void Give(std::unique_ptr<Set> set) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(set));
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Set>> free_;
};
ScratchPool g_scratch;

// The SwiGLU on rows of gu = [g | u] (row stride 2f).
// h = silu(g) * u.
DSJ_VECTOR_CLONES void SwigluForward(const float* __restrict gu, float* __restrict h, int64_t rows,
                                     int64_t f) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict g = gu + r * 2 * f;
    float* __restrict hr = h + r * f;
    for (int64_t c = 0; c < f; ++c) hr[c] = g[c] * Sigmoid(g[c]) * g[f + c];
  }
}

// dst = w * src over d floats.
DSJ_VECTOR_CLONES void ScaleRow(float* __restrict dst, const float* __restrict src, float w, int64_t d) {
  for (int64_t c = 0; c < d; ++c) dst[c] = w * src[c];
}

// Given dh' = dout_row Wd^T (the cotangent before the gate weight w of the row): the gate weight's
// gradient dw = dh' . h, hs = w * h (for dWd), and d[gu] = [dh u silu'(g) | dh silu(g)] with dh = w dh'.
DSJ_VECTOR_CLONES void SwigluBackward(const float* __restrict gu, const float* __restrict dhp,
                                      const float* __restrict w, float* __restrict hs,
                                      float* __restrict dw, float* __restrict dgu, int64_t rows,
                                      int64_t f) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict g = gu + r * 2 * f;
    const float* __restrict d = dhp + r * f;
    float* __restrict hr = hs + r * f;
    float* __restrict dg = dgu + r * 2 * f;
    const float wr = w[r];
    float acc = 0.f;
    for (int64_t c = 0; c < f; ++c) {
      const float a = g[c], u = g[f + c], s = Sigmoid(a), silu = a * s, h = silu * u, dh = wr * d[c];
      acc += d[c] * h;
      hr[c] = wr * h;
      dg[c] = dh * u * s * (1.f + a * (1.f - s));
      dg[f + c] = dh * silu;
    }
    dw[r] = acc;
  }
}

// out[t] = sum over the K rows of token t of rows (rows [T*K, d] in flat assignment order), for tokens
// [t0, t1).
DSJ_VECTOR_CLONES void SumOverK(const float* __restrict rows, float* __restrict out, int64_t t0, int64_t t1,
                                int64_t k, int64_t d) {
  for (int64_t t = t0; t < t1; ++t) {
    float* __restrict o = out + t * d;
    const float* __restrict r = rows + t * k * d;
    for (int64_t c = 0; c < d; ++c) o[c] = r[c];
    for (int64_t j = 1; j < k; ++j)
      for (int64_t c = 0; c < d; ++c) o[c] += r[j * d + c];
  }
}

// SumOverK over all T tokens, in chunks on the pool.
void SumOverKParallel(ffi::ThreadPool& pool, const float* rows, float* out, int64_t t, int64_t k,
                      int64_t d) {
  constexpr int64_t kChunk = 64;
  Parallel(pool, (t + kChunk - 1) / kChunk, [&](int64_t i) {
    SumOverK(rows, out, i * kChunk, std::min(t, (i + 1) * kChunk), k, d);
  });
}

// Per-thread scratch of at least n floats, reused across tiles and calls (no allocation, no page faults).
float* Scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[3];
  return Sized(buffers[slot], n);
}

}  // namespace

// out[t] = sum_k w[t, k] (silu(x_t Wg) * (x_t Wu)) Wd with the expert of assignment (t, k).
// Kept for the backward: gu (sorted rows, [x Wg | x Wu]).
static ffi::Error FfnForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> idx,
                             ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> wg,
                             ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                             ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> gu,
                             int64_t k, int64_t tile) {
  if (ffi::Error err = dsj::CheckReady(); err.failure()) return err;
  const int64_t experts = wg.dimensions()[0], d = x.dimensions()[1], f = wg.dimensions()[2];
  const int64_t rows = idx.element_count(), tokens = x.dimensions()[0];
  const Layout l = MakeLayout(idx.typed_data(), rows, experts, tile);
  const int64_t* ord = l.order.data();
  const float *X = x.typed_data(), *W = weights.typed_data();
  const float *WG = wg.typed_data(), *WU = wu.typed_data(), *WD = wd.typed_data();
  float *OUT = out->typed_data(), *GU = gu->typed_data();
  std::unique_ptr<ScratchPool::Set> scratch = g_scratch.Take();
  float* Y = Sized(scratch->rows, rows * d);   // w * y per flat assignment
  for (int64_t r = l.total; r < rows; ++r) {
    std::memset(Y + ord[r] * d, 0, sizeof(float) * d);
    std::memset(GU + r * 2 * f, 0, sizeof(float) * 2 * f);
  }
  Parallel(pool, static_cast<int64_t>(l.tiles.size()), [&](int64_t i) {
    const Tile& t = l.tiles[i];
    float *xt = Scratch(0, t.rows * d), *h = Scratch(1, t.rows * f), *yt = Scratch(2, t.rows * d);
    GatherRows(xt, X, t.row0, t.rows, d, [&](int64_t r) { return ord[r] / k; });
    float* g = GU + t.row0 * 2 * f;
    Gemm(false, false, t.rows, f, d, xt, d, WG + t.expert * d * f, f, 0.f, g, 2 * f);
    Gemm(false, false, t.rows, f, d, xt, d, WU + t.expert * d * f, f, 0.f, g + f, 2 * f);
    SwigluForward(g, h, t.rows, f);
    Gemm(false, false, t.rows, d, f, h, f, WD + t.expert * f * d, d, 0.f, yt, d);
    for (int64_t r = 0; r < t.rows; ++r) {
      const int64_t a = ord[t.row0 + r];
      ScaleRow(Y + a * d, yt + r * d, W[a], d);
    }
  });
  SumOverKParallel(pool, Y, OUT, tokens, k, d);
  g_scratch.Give(std::move(scratch));
  return ffi::Error::Success();
}

// Given dout [T, D]: dx [T, D], d weights [T, K] and each expert's dWg, dWu, dWd.
static ffi::Error FfnBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> idx,
                              ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> wg,
                              ffi::Buffer<ffi::F32> wu, ffi::Buffer<ffi::F32> wd,
                              ffi::Buffer<ffi::F32> gu, ffi::Buffer<ffi::F32> dout,
                              ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dweights,
                              ffi::ResultBuffer<ffi::F32> dwg, ffi::ResultBuffer<ffi::F32> dwu,
                              ffi::ResultBuffer<ffi::F32> dwd, int64_t k, int64_t tile) {
  if (ffi::Error err = dsj::CheckReady(); err.failure()) return err;
  const int64_t experts = wg.dimensions()[0], d = x.dimensions()[1], f = wg.dimensions()[2];
  const int64_t rows = idx.element_count(), tokens = x.dimensions()[0];
  const Layout l = MakeLayout(idx.typed_data(), rows, experts, tile);
  const int64_t* ord = l.order.data();
  const float *X = x.typed_data(), *W = weights.typed_data();
  const float *WG = wg.typed_data(), *WU = wu.typed_data(), *WD = wd.typed_data();
  const float *GU = gu.typed_data(), *DOUT = dout.typed_data();
  float *DX = dx->typed_data(), *DW = dweights->typed_data();
  float *DWG = dwg->typed_data(), *DWU = dwu->typed_data(), *DWD = dwd->typed_data();
  std::unique_ptr<ScratchPool::Set> scratch = g_scratch.Take();
  float *xs = Sized(scratch->xs, l.total * d), *dys = Sized(scratch->dys, l.total * d);
  float *hs = Sized(scratch->h, l.total * f), *dgu = Sized(scratch->dgu, l.total * 2 * f);
  float* dxr = Sized(scratch->rows, rows * d);   // dx per flat assignment
  for (int64_t r = l.total; r < rows; ++r) {
    std::memset(dxr + ord[r] * d, 0, sizeof(float) * d);
    DW[ord[r]] = 0.f;
  }
  Parallel(pool, static_cast<int64_t>(l.tiles.size()), [&](int64_t i) {
    const Tile& t = l.tiles[i];
    float *xt = xs + t.row0 * d, *dyt = dys + t.row0 * d;
    GatherRows(xt, X, t.row0, t.rows, d, [&](int64_t r) { return ord[r] / k; });
    GatherRows(dyt, DOUT, t.row0, t.rows, d, [&](int64_t r) { return ord[r] / k; });
    float *dhp = Scratch(0, t.rows * f), *dxt = Scratch(1, t.rows * d), *wt = Scratch(2, 2 * t.rows);
    float* dwt = wt + t.rows;
    for (int64_t r = 0; r < t.rows; ++r) wt[r] = W[ord[t.row0 + r]];
    Gemm(false, true, t.rows, f, d, dyt, d, WD + t.expert * f * d, d, 0.f, dhp, f);
    const float* g = GU + t.row0 * 2 * f;
    float* dg = dgu + t.row0 * 2 * f;
    SwigluBackward(g, dhp, wt, hs + t.row0 * f, dwt, dg, t.rows, f);
    Gemm(false, true, t.rows, d, f, dg, 2 * f, WG + t.expert * d * f, f, 0.f, dxt, d);
    Gemm(false, true, t.rows, d, f, dg + f, 2 * f, WU + t.expert * d * f, f, 1.f, dxt, d);
    for (int64_t r = 0; r < t.rows; ++r) {
      const int64_t a = ord[t.row0 + r];
      std::memcpy(dxr + a * d, dxt + r * d, sizeof(float) * d);
      DW[a] = dwt[r];
    }
  });
  // Per expert: d[Wg | Wu] = xs^T d[gu] as one product, split into dWg and dWu; dWd = (w h)^T dout rows.
  Parallel(pool, 2 * experts, [&](int64_t i) {
    const int64_t e = i / 2, r0 = l.start[e], n_rows = l.start[e + 1] - r0;
    if (i % 2 == 1) {
      float* o = DWD + e * f * d;
      if (n_rows == 0) std::memset(o, 0, sizeof(float) * f * d);
      else Gemm(true, false, f, d, n_rows, hs + r0 * f, f, dys + r0 * d, d, 0.f, o, d);
      return;
    }
    float* both = Scratch(0, d * 2 * f);
    if (n_rows == 0) std::memset(both, 0, sizeof(float) * d * 2 * f);
    else Gemm(true, false, d, 2 * f, n_rows, xs + r0 * d, d, dgu + r0 * 2 * f, 2 * f, 0.f, both, 2 * f);
    for (int64_t j = 0; j < d; ++j) {
      std::memcpy(DWG + (e * d + j) * f, both + j * 2 * f, sizeof(float) * f);
      std::memcpy(DWU + (e * d + j) * f, both + j * 2 * f + f, sizeof(float) * f);
    }
  });
  SumOverKParallel(pool, dxr, DX, tokens, k, d);
  g_scratch.Give(std::move(scratch));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsj_host_moe_ffn_fwd, FfnForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [T, D]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx [T, K] expert ids
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights [T, K] gate weights
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_gate [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_up [E, D, F]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_down [E, F, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // gu [T*K, 2F], sorted order
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("tile"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsj_host_moe_ffn_bwd, FfnBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::S32>>()   // idx
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weights
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_gate
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_up
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_down
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gu
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dx [T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d weights [T, K]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d w_gate
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d w_up
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d w_down
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("tile"));
