// MLA's causal attention on the host (CPU) as XLA FFI custom calls: see kernels/host_attention.py.
//
// Per (batch, head) pair, one task on XLA's intra-op pool: the pair's queries [q_nope | q_pe] and keys
// [k_nope | k_pe] (k_pe shared by the heads) are packed into contiguous [S, N + R] buffers, then each block
// of `block` query rows scores only the keys up to its last row with single-threaded BLAS sgemm calls
// (host_blas.h): the masked upper triangle is skipped block by block, values (from kv = [k_nope | v]) and
// outputs are read and written in place with their [B, S, H, *] strides, and no [B, H, S, S] tensor is ever stored. The forward
// keeps the log-sum-exp of each row; the backward recomputes the probabilities from it (flash-attention
// style), processing the blocks from the last (which sees every key) to the first so that the key and
// value gradients accumulate in place.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "host_blas.h"

namespace ffi = xla::ffi;
using dsj::Gemm;
using dsj::Parallel;
using dsj::Sized;

namespace {

// Shapes of one call: q_nope [B,S,H,N], q_pe [B,S,H,R], kv [B,S,H,N+V] (k_nope | v per head), k_pe
// [B,S,R]; kv is read in place, k_nope and v with row stride H * (N + V).
struct Dims {
  int64_t b, s, h, n, r, v, dq, kvw, block;
};

Dims DimsOf(ffi::Buffer<ffi::F32>& q_nope, ffi::Buffer<ffi::F32>& q_pe, ffi::Buffer<ffi::F32>& kv,
            int64_t block) {
  const auto qd = q_nope.dimensions();
  Dims d{qd[0], qd[1], qd[2], qd[3], q_pe.dimensions()[3], kv.dimensions()[3] - qd[3], 0, 0, block};
  d.dq = d.n + d.r;
  d.kvw = d.n + d.v;
  return d;
}

// Per-thread scratch of at least n floats, reused across tasks and calls.
float* Scratch(int slot, int64_t n) {
  thread_local std::vector<float> buffers[6];
  return Sized(buffers[slot], n);
}

// q [S, N + R] and k [S, N + R] of pair (b, h), packed from their strided inputs.
void Pack(const Dims& d, int64_t b, int64_t h, const float* qn, const float* qp, const float* kv,
          const float* kp, float* q, float* k) {
  for (int64_t t = 0; t < d.s; ++t) {
    const int64_t row = (b * d.s + t) * d.h + h;
    std::memcpy(q + t * d.dq, qn + row * d.n, sizeof(float) * d.n);
    std::memcpy(q + t * d.dq + d.n, qp + row * d.r, sizeof(float) * d.r);
    std::memcpy(k + t * d.dq, kv + row * d.kvw, sizeof(float) * d.n);
    std::memcpy(k + t * d.dq + d.n, kp + (b * d.s + t) * d.r, sizeof(float) * d.r);
  }
}

// Rows of logits s [rows, keys] (row i is query a + i, which sees keys 0..a + i) become probabilities,
// zero above the diagonal; lse[i] = log sum exp of the scaled visible logits.
DSJ_VECTOR_CLONES void SoftmaxRows(float* __restrict s, float* __restrict lse, int64_t rows, int64_t keys,
                                   int64_t a, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict row = s + i * keys;
    const int64_t visible = a + i + 1;
    float mx = row[0] * scale;
    for (int64_t j = 0; j < visible; ++j) {
      row[j] *= scale;
      mx = std::max(mx, row[j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < visible; ++j) {
      row[j] = std::exp(row[j] - mx);
      sum += row[j];
    }
    const float inv = 1.f / sum;
    for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
    for (int64_t j = visible; j < keys; ++j) row[j] = 0.f;
    lse[i] = mx + std::log(sum);
  }
}

// The probabilities of SoftmaxRows again, from the saved lse.
DSJ_VECTOR_CLONES void ProbabilitiesFromLse(float* __restrict s, const float* __restrict lse, int64_t rows,
                                            int64_t keys, int64_t a, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    float* __restrict row = s + i * keys;
    const int64_t visible = a + i + 1;
    const float l = lse[i];
    // Scaled in a pass of its own, as SoftmaxRows does: a fused multiply-add of the scale and the lse
    // would skip the rounding of the scaled logit, and the row's largest p would miss 1.
    for (int64_t j = 0; j < visible; ++j) row[j] *= scale;
    for (int64_t j = 0; j < visible; ++j) row[j] = std::exp(row[j] - l);
    for (int64_t j = visible; j < keys; ++j) row[j] = 0.f;
  }
}

// dp [rows, keys] becomes the logits' gradient scale * p * (dp - delta_i), with delta_i = sum_j p_ij dp_ij
// (= <dout_i, out_i>), taken from the same dp so that a row whose softmax is constant (one visible key)
// gets exactly zero, whatever order the BLAS summed dp in.
DSJ_VECTOR_CLONES void LogitGradient(const float* __restrict p, float* __restrict dp, int64_t rows,
                                     int64_t keys, float scale) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* __restrict pr = p + i * keys;
    float* __restrict dr = dp + i * keys;
    float delta = 0.f;
    for (int64_t j = 0; j < keys; ++j) delta += pr[j] * dr[j];
    for (int64_t j = 0; j < keys; ++j) dr[j] = scale * pr[j] * (dr[j] - delta);
  }
}

}  // namespace

// out [B,S,H,V] = causal softmax(scale [q_nope | q_pe] [k_nope | k_pe]^T) v; lse [B,H,S].
static ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                                   ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::F32> kv,
                                   ffi::Buffer<ffi::F32> k_pe, ffi::ResultBuffer<ffi::F32> out,
                                   ffi::ResultBuffer<ffi::F32> lse, float scale, int64_t block) {
  if (ffi::Error err = dsj::CheckReady(); err.failure()) return err;
  const Dims d = DimsOf(q_nope, q_pe, kv, block);
  const float *QN = q_nope.typed_data(), *QP = q_pe.typed_data(), *KV = kv.typed_data();
  const float* KP = k_pe.typed_data();
  float *O = out->typed_data(), *L = lse->typed_data();
  const int64_t ks = d.h * d.kvw, os = d.h * d.v;   // row strides of kv and of out
  Parallel(pool, d.b * d.h, [&](int64_t task) {
    const int64_t b = task / d.h, h = task % d.h;
    float *q = Scratch(0, d.s * d.dq), *k = Scratch(1, d.s * d.dq);
    float* s = Scratch(2, std::min(d.block, d.s) * d.s);
    Pack(d, b, h, QN, QP, KV, KP, q, k);
    const float* vb = KV + (b * d.s * d.h + h) * d.kvw + d.n;
    float* ob = O + (b * d.s * d.h + h) * d.v;
    for (int64_t a = 0; a < d.s; a += d.block) {
      const int64_t rows = std::min(d.block, d.s - a), keys = a + rows;
      Gemm(false, true, rows, keys, d.dq, q + a * d.dq, d.dq, k, d.dq, 0.f, s, keys);
      SoftmaxRows(s, L + (b * d.h + h) * d.s + a, rows, keys, a, scale);
      Gemm(false, false, rows, d.v, keys, s, keys, vb, ks, 0.f, ob + a * os, os);
    }
  });
  return ffi::Error::Success();
}

// Gradients of AttentionForward's out: dq_nope, dq_pe, d[kv] in their inputs' layouts, and each head's
// part of dk_pe, [B,S,H,R] (the caller sums over H).
static ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q_nope,
                                    ffi::Buffer<ffi::F32> q_pe, ffi::Buffer<ffi::F32> kv,
                                    ffi::Buffer<ffi::F32> k_pe, ffi::Buffer<ffi::F32> lse,
                                    ffi::Buffer<ffi::F32> dout,
                                    ffi::ResultBuffer<ffi::F32> dq_nope, ffi::ResultBuffer<ffi::F32> dq_pe,
                                    ffi::ResultBuffer<ffi::F32> dkv, ffi::ResultBuffer<ffi::F32> dk_pe_heads,
                                    float scale, int64_t block) {
  if (ffi::Error err = dsj::CheckReady(); err.failure()) return err;
  const Dims d = DimsOf(q_nope, q_pe, kv, block);
  const float *QN = q_nope.typed_data(), *QP = q_pe.typed_data(), *KV = kv.typed_data();
  const float* KP = k_pe.typed_data();
  const float *L = lse.typed_data(), *DO = dout.typed_data();
  float *DQN = dq_nope->typed_data(), *DQP = dq_pe->typed_data(), *DKV = dkv->typed_data();
  float* DKP = dk_pe_heads->typed_data();
  const int64_t ks = d.h * d.kvw, os = d.h * d.v;   // row strides of kv / dkv and of out / dout
  const int64_t last = (d.s - 1) / d.block * d.block;   // first row of the last block
  Parallel(pool, d.b * d.h, [&](int64_t task) {
    const int64_t b = task / d.h, h = task % d.h;
    float *q = Scratch(0, d.s * d.dq), *k = Scratch(1, d.s * d.dq);
    float *dq = Scratch(2, d.s * d.dq), *dk = Scratch(3, d.s * d.dq);
    float *p = Scratch(4, std::min(d.block, d.s) * d.s), *dp = Scratch(5, std::min(d.block, d.s) * d.s);
    Pack(d, b, h, QN, QP, KV, KP, q, k);
    const int64_t ko = (b * d.s * d.h + h) * d.kvw + d.n;   // offset of the pair's v in kv and dkv
    const int64_t oo = (b * d.s * d.h + h) * d.v;            // offset of the pair in out and dout
    for (int64_t a = last; a >= 0; a -= d.block) {
      const int64_t rows = std::min(d.block, d.s - a), keys = a + rows;
      const float beta = a == last ? 0.f : 1.f;   // the last block sees every key: it initializes dk, dv
      Gemm(false, true, rows, keys, d.dq, q + a * d.dq, d.dq, k, d.dq, 0.f, p, keys);
      ProbabilitiesFromLse(p, L + (b * d.h + h) * d.s + a, rows, keys, a, scale);
      Gemm(false, true, rows, keys, d.v, DO + oo + a * os, os, KV + ko, ks, 0.f, dp, keys);
      LogitGradient(p, dp, rows, keys, scale);
      Gemm(false, false, rows, d.dq, keys, dp, keys, k, d.dq, 0.f, dq + a * d.dq, d.dq);
      Gemm(true, false, keys, d.dq, rows, dp, keys, q + a * d.dq, d.dq, beta, dk, d.dq);
      Gemm(true, false, keys, d.v, rows, p, keys, DO + oo + a * os, os, beta, DKV + ko, ks);
    }
    for (int64_t t = 0; t < d.s; ++t) {
      const int64_t row = (b * d.s + t) * d.h + h;
      std::memcpy(DQN + row * d.n, dq + t * d.dq, sizeof(float) * d.n);
      std::memcpy(DQP + row * d.r, dq + t * d.dq + d.n, sizeof(float) * d.r);
      std::memcpy(DKV + row * d.kvw, dk + t * d.dq, sizeof(float) * d.n);
      std::memcpy(DKP + row * d.r, dk + t * d.dq + d.n, sizeof(float) * d.r);
    }
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsj_host_attention_fwd, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q_nope [B, S, H, N]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q_pe [B, S, H, R]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv [B, S, H, N + V]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_pe [B, S, R]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [B, S, H, V]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse [B, H, S]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(dsj_host_attention_bwd, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q_nope
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q_pe
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_pe
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // dout [B, S, H, V]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_nope
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq_pe
                                  .Ret<ffi::Buffer<ffi::F32>>()   // d kv [B, S, H, N + V]
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk_pe per head [B, S, H, R]
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("block"));
