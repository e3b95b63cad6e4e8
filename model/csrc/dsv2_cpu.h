// Shared by the CPU kernel sources (model/csrc): bf16 helpers, the ISA levels, the few-row
// product `dot_range` and the ops other sources compose (see dsv2_cpu.cpp).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DSV2_X86 1
#else
#define DSV2_X86 0
#endif

namespace dsv2 {

using bf16 = uint16_t;  // raw bfloat16 bits

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

inline float bf16_to_float(bf16 v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16(u >> 16);
}

inline float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

inline float load_f(const float* p) { return *p; }
inline float load_f(const bf16* p) { return bf16_to_float(*p); }

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// the value the eager path stores: rounded to bf16 in a bf16 model
inline float stored(float v, bool bf) { return bf ? round_bf16(v) : v; }

// RMSNorm of one row x[0, D) as model/norm.py defines it, into float32 out[0, D): float32
// normalisation; with bf16 weights (a bf16 model) the normalised value is rounded before the
// weight multiplies and the product rounded again. The eager op (rms_norm) and the fused
// decode both call this, so the two stay bit for bit the same.
template <typename X, typename W>
void rms_norm_row(const X* x, const W* w, int64_t D, float eps, float* out) {
  constexpr bool bf = std::is_same_v<W, bf16>;
  float ss = 0.0f;
  for (int64_t d = 0; d < D; ++d) ss += load_f(x + d) * load_f(x + d);
  const float r = 1.0f / std::sqrt(ss / float(D) + eps);
  for (int64_t d = 0; d < D; ++d)
    out[d] = bf ? round_bf16(load_f(w + d) * round_bf16(load_f(x + d) * r))
                : load_f(x + d) * r * load_f(w + d);
}

// Rotary embedding of P adjacent pairs (x[2p], x[2p + 1]) by rot[p] (complex64 as cos, sin
// pairs), as model/rope.py's apply_rotary computes it, into float32 out (may be x itself when
// X is float); values rounded to bf16 when bf. Shared by the eager op and the fused decode.
template <typename X>
void rotary_pairs(const X* x, const float* rot, int64_t P, bool bf, float* out) {
  for (int64_t p = 0; p < P; ++p) {
    const float c = rot[2 * p], sn = rot[2 * p + 1];
    const float a = load_f(x + 2 * p), b = load_f(x + 2 * p + 1);
    out[2 * p] = stored(a * c - b * sn, bf);
    out[2 * p + 1] = stored(a * sn + b * c, bf);
  }
}

// Rows of x in the form the chosen path reads: float32 rows, or bf16 rows for vdpbf16ps.
struct Rows {
  std::vector<const float*> f;
  std::vector<const bf16*> h;
};

// Row pointers of M rows at f (float32) or h (bf16; the one not null), row stride ld, as the
// products read them
inline Rows strided_rows(const float* f, const bf16* h, int64_t M, int64_t ld) {
  Rows r;
  for (int64_t m = 0; m < M; ++m) {
    if (h != nullptr) r.h.push_back(h + m * ld);
    else r.f.push_back(f + m * ld);
  }
  return r;
}

// The vector path in use (an Isa), chosen once from cpuid unless set_isa changed it.
int64_t current_isa();

// y [M, N] (ldy) = x rows . w rows [n0, n1), dispatched on isa and the weight's dtype
// (instantiated for float and bf16 weights in dsv2_cpu.cpp)
template <typename W>
void dot_range(int64_t isa, const W* w, int64_t ldw, int64_t n0, int64_t n1, const Rows& x,
               int64_t M, int64_t K, float* y, int64_t ldy);

// acc[m * lda + j] += sum_l p[m * ldp + l] * rows[l * ldr + j] for m < M, l < L, j < n: the
// probability-weighted sum of cached rows in attention (float32 accumulators)
template <typename W>
void weighted_rows(int64_t isa, const float* p, int64_t ldp, int64_t M, const W* rows,
                   int64_t ldr, int64_t L, int64_t n, float* acc, int64_t lda);

// whether the chosen path reads x as bf16 rows (vdpbf16ps) for weights of this dtype
bool uses_bf16_rows(int64_t isa, bool bf16_weights);

// f(i0, i1) over [0, n) in chunks of `chunk`, on torch's threads: each thread takes the
// next chunk when done with its last (dynamic), so a thread that reads memory slower (other
// tenants of a VM, a cold cache) does less of the work instead of the others waiting for it
// at the end. One thread (or one chunk's worth) runs f(0, n) as one stream.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  if (n <= 0) return;
  chunk = std::max<int64_t>(1, chunk);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  if (threads <= 1 || at::in_parallel_region()) return f(0, n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t i0 = next.fetch_add(chunk, std::memory_order_relaxed);
      if (i0 >= n) break;
      f(i0, std::min(n, i0 + chunk));
    }
  });
}

// Parallel over blocks of 4 weight rows in chunks of ~64 KB of weights, so small matrices
// are not split across threads for nothing.
template <typename F>
void parallel_rows(int64_t N, int64_t row_bytes, const F& f) {
  int64_t blocks = (N + 3) / 4;
  int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, 4 * row_bytes));
  parallel_chunks(blocks, grain, [&](int64_t b0, int64_t b1) { f(b0 * 4, std::min(N, b1 * 4)); });
}

void check_weight(const at::Tensor& w, int64_t dims, const char* name);

// y [M, N] (contiguous) = x rows . w^T for a row-major w [N, K] (float32 or bf16), split
// across threads by parallel_rows; x in the form uses_bf16_rows asks for w's dtype
void product_rows(int64_t isa, const Rows& x, int64_t M, const at::Tensor& w, float* y);

// x [M, K] (any float dtype) -> float32 or bf16 rows as the path needs; `keep` owns the copy
Rows make_rows(const at::Tensor& x, bool want_bf16, at::Tensor& keep);

at::Tensor linear(const at::Tensor& x, const at::Tensor& w);
// The routed experts of moe() over rows given as pointers (x: N rows of D values, in the form
// uses_bf16_rows asks for), choices idp / weights wp [N, K] -> out [N, D] float32 (values
// rounded to bf16 when round_out, as a bf16 tensor stores them).
void moe_rows(int64_t isa, const Rows& x, int64_t N, int64_t D, const int64_t* idp,
              const float* wp, int64_t K, const at::Tensor& gate_up, const at::Tensor& down,
              int64_t start, bool round_out, float* out);

at::Tensor moe(const at::Tensor& hidden, const at::Tensor& expert_ids, const at::Tensor& weights,
               const at::Tensor& gate_up, const at::Tensor& down, int64_t start);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);

// the fused decode layer halves (dsv2_decode.cpp)
at::Tensor mla_decode(const at::Tensor& x, const at::Tensor& in_norm, double eps,
                      const at::Tensor& qkv_a, const std::optional<at::Tensor>& q_a_norm,
                      const std::optional<at::Tensor>& q_b, const at::Tensor& kv_a_norm,
                      double lora_eps, const at::Tensor& w_uk_t, const at::Tensor& kv_b,
                      const at::Tensor& o_proj, const at::Tensor& cache, const at::Tensor& slots,
                      const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& rot,
                      int64_t heads, int64_t nope, int64_t rope, int64_t vdim, double scale);
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& post_norm, double eps,
                      const at::Tensor& gate_w, int64_t top_k, int64_t n_group, int64_t topk_group,
                      bool norm_topk_prob, double scaling, const at::Tensor& gate_up,
                      const at::Tensor& down, int64_t start,
                      const std::optional<at::Tensor>& shared_gate_up,
                      const std::optional<at::Tensor>& shared_down);
at::Tensor mlp_decode(const at::Tensor& x, const at::Tensor& post_norm, double eps,
                      const at::Tensor& gate_up, const at::Tensor& down);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& rot);

}  // namespace dsv2
