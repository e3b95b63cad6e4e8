// CPU kernels for the few-row products of decoding (model/cpu_ext.py builds and loads this).
//
// A decode step multiplies a handful of rows by every weight matrix once, so it is bound by
// reading the weights. Two ops:
//  - dsv2_cpu::linear(x [M, K], w [N, K]) -> [M, N]: each thread streams its share of W's
//    rows once and multiplies them with all M rows of x held in L1;
//  - dsv2_cpu::moe(hidden, expert_ids, weights, gate_up, down, start): a layer's routed
//    experts in one call: each expert's weights are read once for all the rows routed to it
//    (gate/up, SiLU * up, down, weighted sum), with no Python between the pieces.
// Weights are float32 or bfloat16, row-major; products accumulate in float32. bfloat16
// widens to float32 in registers (AVX-512 / AVX2) or uses vdpbf16ps (AVX512-BF16); a plain
// C++ path runs anywhere. The path is chosen at runtime (set_isa, clamped to what this CPU
// reports), never by compiler flags: this file is compiled for the baseline x86-64 and
// each vector path is a region compiled for its own target.
#include "dsv2_cpu.h"

#include <atomic>
#include <limits>
#include <type_traits>

namespace dsv2 {


// y[m * ldy + n] = sum_k x[m][k] * w[n * ldw + k] for n < N, m < M: the contract of every
// `dot` below. x is given as M row pointers (the rows routed to an expert are scattered).
namespace scalar {
template <typename W, typename X>
void dot(const W* w, int64_t ldw, int64_t N, const X* const* x, int64_t M, int64_t K, float* y,
         int64_t ldy) {
  for (int64_t n = 0; n < N; ++n) {
    const W* wr = w + n * ldw;
    for (int64_t m = 0; m < M; ++m) {
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums, like one vector register
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) part[j] += load_f(x[m] + k + j) * load_f(wr + k + j);
      float s = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
      for (; k < K; ++k) s += load_f(x[m] + k) * load_f(wr + k);
      y[m * ldy + n] = s;
    }
  }
}

template <typename W>
void weighted_rows(const float* p, int64_t ldp, int64_t M, const W* rows, int64_t ldr, int64_t L,
                   int64_t n, float* acc, int64_t lda) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t l = 0; l < L; ++l) {
      const float pl = p[m * ldp + l];
      const W* r = rows + l * ldr;
      for (int64_t j = 0; j < n; ++j) acc[m * lda + j] += pl * load_f(r + j);
    }
}
}  // namespace scalar

#if DSV2_X86
// ---- AVX2 + FMA: 8 floats a register -----------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 4 weight rows x MB rows of x; rows beyond nr / mr alias row 0 (read, never stored)
template <typename W, int MB>
void block(const W* const* wr, int nr, const float* const* xr, int mr, int64_t K, float* y,
           int64_t ldy, int64_t pf) {
  __m256 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = load8(wr[j] + k);
    if ((k & 15) == 0)  // one line ahead per row: the next 4 rows, while these compute
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k + pf), _MM_HINT_T0);
    for (int i = 0; i < MB; ++i) {
      __m256 xv = _mm256_loadu_ps(xr[i] + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t t = k; t < K; ++t) s += xr[i][t] * load_f(wr[j] + t);
      y[i * ldy + j] = s;
    }
}

template <typename W>
void dot(const W* w, int64_t ldw, int64_t N, const float* const* x, int64_t M, int64_t K,
         float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += 4) {
    int nr = int(std::min<int64_t>(4, N - n0));
    const W* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = w + (n0 + (j < nr ? j : 0)) * ldw;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      int mr = int(std::min<int64_t>(4, M - m0));
      const float* xr[4];
      for (int i = 0; i < 4; ++i) xr[i] = x[m0 + (i < mr ? i : 0)];
      float* yb = y + m0 * ldy + n0;
      // prefetch distance: the same columns 4 rows on (the next block), while the first
      // m-block streams these rows; later m-blocks re-read them from L1
      const int64_t pf = (m0 == 0 && n0 + 4 < N) ? 4 * ldw : 0;
      switch (mr) {
        case 1: block<W, 1>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        case 2: block<W, 2>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        case 3: block<W, 3>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        default: block<W, 4>(wr, nr, xr, mr, K, yb, ldy, pf); break;
      }
    }
  }
}

// acc rows += p-weighted cached rows: 8 columns at a time, all L rows per column strip, so
// each accumulator stays in a register and every row is read once per strip
template <typename W>
void weighted_rows(const float* p, int64_t ldp, int64_t M, const W* rows, int64_t ldr, int64_t L,
                   int64_t n, float* acc, int64_t lda) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int64_t m = 0; m < M; ++m) {
      __m256 a = _mm256_loadu_ps(acc + m * lda + j);
      const float* pm = p + m * ldp;
      for (int64_t l = 0; l < L; ++l) a = _mm256_fmadd_ps(_mm256_set1_ps(pm[l]), load8(rows + l * ldr + j), a);
      _mm256_storeu_ps(acc + m * lda + j, a);
    }
  for (; j < n; ++j)
    for (int64_t m = 0; m < M; ++m) {
      float a = acc[m * lda + j];
      for (int64_t l = 0; l < L; ++l) a += p[m * ldp + l] * load_f(rows + l * ldr + j);
      acc[m * lda + j] = a;
    }
}
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512: 16 floats a register, masked tails ------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
namespace avx512 {
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename W, int MB>
void block(const W* const* wr, int nr, const float* const* xr, int mr, int64_t K, float* y,
           int64_t ldy, int64_t pf) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = load16(wr[j] + k);
    if (sizeof(W) == 4 || (k & 31) == 0)  // one line ahead per row: the next 4 rows
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k + pf), _MM_HINT_T0);
    for (int i = 0; i < MB; ++i) {
      __m512 xv = _mm512_loadu_ps(xr[i] + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  if (k < K) {
    __mmask16 m = __mmask16((1u << (K - k)) - 1u);
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = load16(wr[j] + k, m);
    for (int i = 0; i < MB; ++i) {
      __m512 xv = _mm512_maskz_loadu_ps(m, xr[i] + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <typename W>
void dot(const W* w, int64_t ldw, int64_t N, const float* const* x, int64_t M, int64_t K,
         float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += 4) {
    int nr = int(std::min<int64_t>(4, N - n0));
    const W* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = w + (n0 + (j < nr ? j : 0)) * ldw;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      int mr = int(std::min<int64_t>(4, M - m0));
      const float* xr[4];
      for (int i = 0; i < 4; ++i) xr[i] = x[m0 + (i < mr ? i : 0)];
      float* yb = y + m0 * ldy + n0;
      // prefetch distance: the same columns 4 rows on (the next block), while the first
      // m-block streams these rows; later m-blocks re-read them from L1
      const int64_t pf = (m0 == 0 && n0 + 4 < N) ? 4 * ldw : 0;
      switch (mr) {
        case 1: block<W, 1>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        case 2: block<W, 2>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        case 3: block<W, 3>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        default: block<W, 4>(wr, nr, xr, mr, K, yb, ldy, pf); break;
      }
    }
  }
}

template <typename W>
void weighted_rows(const float* p, int64_t ldp, int64_t M, const W* rows, int64_t ldr, int64_t L,
                   int64_t n, float* acc, int64_t lda) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1u);
    for (int64_t m = 0; m < M; ++m) {
      __m512 a = _mm512_maskz_loadu_ps(k, acc + m * lda + j);
      const float* pm = p + m * ldp;
      for (int64_t l = 0; l < L; ++l) a = _mm512_fmadd_ps(_mm512_set1_ps(pm[l]), load16(rows + l * ldr + j, k), a);
      _mm512_mask_storeu_ps(acc + m * lda + j, k, a);
    }
  }
}
}  // namespace avx512
#pragma GCC pop_options

// ---- AVX512-BF16: vdpbf16ps, 32 bf16 products a register, x kept in bf16 -------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")
namespace avx512bf16 {
inline __m512bh load32(const bf16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}
inline __m512bh load32(const bf16* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }

template <int MB>
void block(const bf16* const* wr, int nr, const bf16* const* xr, int mr, int64_t K, float* y,
           int64_t ldy, int64_t pf) {
  __m512 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = load32(wr[j] + k);
    for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + k + pf), _MM_HINT_T0);
    for (int i = 0; i < MB; ++i) {
      __m512bh xv = load32(xr[i] + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  if (k < K) {
    __mmask32 m = __mmask32((1ull << (K - k)) - 1ull);
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = load32(wr[j] + k, m);
    for (int i = 0; i < MB; ++i) {
      __m512bh xv = load32(xr[i] + k, m);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

void dot(const bf16* w, int64_t ldw, int64_t N, const bf16* const* x, int64_t M, int64_t K,
         float* y, int64_t ldy) {
  for (int64_t n0 = 0; n0 < N; n0 += 4) {
    int nr = int(std::min<int64_t>(4, N - n0));
    const bf16* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = w + (n0 + (j < nr ? j : 0)) * ldw;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      int mr = int(std::min<int64_t>(4, M - m0));
      const bf16* xr[4];
      for (int i = 0; i < 4; ++i) xr[i] = x[m0 + (i < mr ? i : 0)];
      float* yb = y + m0 * ldy + n0;
      // prefetch distance: the same columns 4 rows on (the next block), while the first
      // m-block streams these rows; later m-blocks re-read them from L1
      const int64_t pf = (m0 == 0 && n0 + 4 < N) ? 4 * ldw : 0;
      switch (mr) {
        case 1: block<1>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        case 2: block<2>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        case 3: block<3>(wr, nr, xr, mr, K, yb, ldy, pf); break;
        default: block<4>(wr, nr, xr, mr, K, yb, ldy, pf); break;
      }
    }
  }
}
}  // namespace avx512bf16
#pragma GCC pop_options
#endif  // DSV2_X86

// ---- runtime choice ---------------------------------------------------------------------
int64_t cpu_max_isa() {
#if DSV2_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    unsigned a, b, c, d;  // avx512_bf16: CPUID leaf 7 sub-leaf 1, EAX bit 5
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    return (a & (1u << 5)) ? kAvx512Bf16 : kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

std::atomic<int64_t> g_isa{-1};

int64_t current_isa() {
  int64_t isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = cpu_max_isa();
    g_isa.store(isa);
  }
  return isa;
}

// Use `wanted` (an Isa) or the best below it this CPU has; returns the level in use.
int64_t set_isa(int64_t wanted) {
  int64_t isa = std::max<int64_t>(kScalar, std::min(wanted, cpu_max_isa()));
  g_isa.store(isa);
  return isa;
}

int64_t get_isa() { return current_isa(); }

// How many threads one at::parallel_for of this library runs on: torch's thread count when
// it was built with OpenMP, 1 when not (the pragmas then compile to nothing).
int64_t parallel_threads() {
  std::vector<std::atomic<int>> seen(std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, int64_t(seen.size()), 1, [&](int64_t, int64_t) {
    seen[at::get_thread_num() % seen.size()].store(1);
  });
  int64_t n = 0;
  for (auto& s : seen) n += s.load();
  return n;
}


// y [M, N] (ldy) = x rows . w rows [n0, n1), dispatched on isa and the weight's dtype
template <typename W>
void dot_range(int64_t isa, const W* w, int64_t ldw, int64_t n0, int64_t n1, const Rows& x,
               int64_t M, int64_t K, float* y, int64_t ldy) {
  const W* wb = w + n0 * ldw;
  float* yb = y + n0;
  int64_t N = n1 - n0;
#if DSV2_X86
  if constexpr (std::is_same_v<W, bf16>) {
    if (isa >= kAvx512Bf16) return avx512bf16::dot(wb, ldw, N, x.h.data(), M, K, yb, ldy);
  }
  if (isa >= kAvx512) return avx512::dot<W>(wb, ldw, N, x.f.data(), M, K, yb, ldy);
  if (isa >= kAvx2) return avx2::dot<W>(wb, ldw, N, x.f.data(), M, K, yb, ldy);
#endif
  scalar::dot<W, float>(wb, ldw, N, x.f.data(), M, K, yb, ldy);
}

template void dot_range<float>(int64_t, const float*, int64_t, int64_t, int64_t, const Rows&,
                               int64_t, int64_t, float*, int64_t);
template void dot_range<bf16>(int64_t, const bf16*, int64_t, int64_t, int64_t, const Rows&,
                              int64_t, int64_t, float*, int64_t);

template <typename W>
void weighted_rows(int64_t isa, const float* p, int64_t ldp, int64_t M, const W* rows,
                   int64_t ldr, int64_t L, int64_t n, float* acc, int64_t lda) {
#if DSV2_X86
  if (isa >= kAvx512) return avx512::weighted_rows<W>(p, ldp, M, rows, ldr, L, n, acc, lda);
  if (isa >= kAvx2) return avx2::weighted_rows<W>(p, ldp, M, rows, ldr, L, n, acc, lda);
#endif
  scalar::weighted_rows<W>(p, ldp, M, rows, ldr, L, n, acc, lda);
}

template void weighted_rows<float>(int64_t, const float*, int64_t, int64_t, const float*, int64_t,
                                   int64_t, int64_t, float*, int64_t);
template void weighted_rows<bf16>(int64_t, const float*, int64_t, int64_t, const bf16*, int64_t,
                                  int64_t, int64_t, float*, int64_t);

bool uses_bf16_rows(int64_t isa, bool bf16_weights) {
  return bf16_weights && isa >= kAvx512Bf16 && DSV2_X86;
}

void check_weight(const at::Tensor& w, int64_t dims, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(w.dim() == dims, name, " must have ", dims, " dimensions, got ", w.dim());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16");
  TORCH_CHECK(w.stride(-1) == 1, name, " must be row-major (stride 1 along its last dim)");
}

// x [M, K] (any float dtype) -> float32 or bf16 rows as the path needs; `keep` owns the copy
Rows make_rows(const at::Tensor& x, bool want_bf16, at::Tensor& keep) {
  keep = x.to(want_bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  if (want_bf16)
    return strided_rows(nullptr, reinterpret_cast<const bf16*>(keep.data_ptr()), x.size(0), keep.stride(0));
  return strided_rows(keep.data_ptr<float>(), nullptr, x.size(0), keep.stride(0));
}

void product_rows(int64_t isa, const Rows& x, int64_t M, const at::Tensor& w, float* y) {
  const int64_t N = w.size(0), K = w.size(1);
  if (w.scalar_type() == at::kBFloat16) {
    auto* wp = reinterpret_cast<const bf16*>(w.data_ptr());
    parallel_rows(N, K * 2, [&](int64_t n0, int64_t n1) {
      dot_range<bf16>(isa, wp, w.stride(0), n0, n1, x, M, K, y, N);
    });
  } else {
    const float* wp = w.data_ptr<float>();
    parallel_rows(N, K * 4, [&](int64_t n0, int64_t n1) {
      dot_range<float>(isa, wp, w.stride(0), n0, n1, x, M, K, y, N);
    });
  }
}

// ---- ops --------------------------------------------------------------------------------
at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  check_weight(w, 2, "weight");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "x must be a 2-D CPU tensor");
  TORCH_CHECK(x.size(1) == w.size(1), "x has ", x.size(1), " columns, weight ", w.size(1));
  int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  int64_t isa = current_isa();
  bool wb = w.scalar_type() == at::kBFloat16;
  at::Tensor xk;
  Rows rows = make_rows(x, uses_bf16_rows(isa, wb), xk);
  auto y = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M > 0 && N > 0) product_rows(isa, rows, M, w, y.data_ptr<float>());
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}


// Rows of an expert matrix one task reads: `rows` split so the `experts` matrices give
// about 4 tasks per thread, in multiples of 16, at least 16.
int64_t block_rows(int64_t rows, int64_t experts, int64_t threads) {
  const int64_t tasks_per_expert = std::max<int64_t>(1, (4 * threads + experts - 1) / experts);
  const int64_t b = (rows + tasks_per_expert - 1) / tasks_per_expert;
  return std::max<int64_t>(16, (b + 15) / 16 * 16);
}

// out [N, D] = sum over the K choices of each row that fall in [start, start + E) of
// weight * down_e(silu(gate_e(x)) * up_e(x)). gate_up [E, 2I, D] (gate rows, then up rows),
// down [E, D, I]. In bfloat16 the intermediate values are rounded where torch's bf16 ops
// round them (gate/up products, SiLU, the product, the expert output), so the result is
// the reference's up to summation order.
void moe_rows(int64_t isa, const Rows& x, int64_t N, int64_t D, const int64_t* idp,
              const float* wp, int64_t K, const at::Tensor& gate_up, const at::Tensor& down,
              int64_t start, bool round_out, float* out) {
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2;
  const bool wb = gate_up.scalar_type() == at::kBFloat16;
  const bool hrows = uses_bf16_rows(isa, wb);

  // group the (row, choice) assignments by local expert (counting sort, stable)
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t a = 0; a < N * K; ++a) {
    int64_t e = idp[a] - start;
    if (e >= 0 && e < E) ++count[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];  // count[e]: first slot of e
  const int64_t A = count[E];
  std::vector<int64_t> slot_of(N * K, -1), row_of(A);
  {
    std::vector<int64_t> next(count.begin(), count.end() - 1);
    for (int64_t a = 0; a < N * K; ++a) {
      int64_t e = idp[a] - start;
      if (e >= 0 && e < E) {
        slot_of[a] = next[e]++;
        row_of[slot_of[a]] = a / K;
      }
    }
  }
  std::fill(out, out + N * D, 0.0f);
  if (A == 0) return;

  Rows xs;  // x rows in slot order
  for (int64_t s = 0; s < A; ++s) {
    if (hrows) xs.h.push_back(x.h[row_of[s]]);
    else xs.f.push_back(x.f[row_of[s]]);
  }
  std::vector<int64_t> active;  // experts with rows
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) active.push_back(e);
  const int64_t n_active = int64_t(active.size());

  // phase 1: h [A, I] = silu(gate) * up, in blocks of 16 intermediate rows per expert
  // Blocks of intermediate rows per task: as large as the thread count allows (about 4
  // tasks a thread), at least 16 rows. Each block is one sequential read of gate rows and
  // one of up rows; with one thread, each expert's whole gate/up is two long streams
  // instead of 2 * I / 16 short ones the prefetchers restart on.
  const int64_t threads = at::get_num_threads();
  const int64_t IB = block_rows(I, n_active, threads);
  const int64_t i_blocks = (I + IB - 1) / IB;
  std::vector<float> hf(hrows ? 0 : A * I);
  std::vector<bf16> hh(hrows ? A * I : 0);
  const char* gu_base = reinterpret_cast<const char*>(gate_up.data_ptr());
  const int64_t el = wb ? 2 : 4;
  parallel_chunks(n_active * i_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> g, u;
    for (int64_t t = t0; t < t1; ++t) {
      int64_t e = active[t / i_blocks], i0 = (t % i_blocks) * IB, ib = std::min(IB, I - i0);
      int64_t s0 = count[e], M = count[e + 1] - s0;
      Rows xe;
      if (hrows) xe.h.assign(xs.h.begin() + s0, xs.h.begin() + s0 + M);
      else xe.f.assign(xs.f.begin() + s0, xs.f.begin() + s0 + M);
      g.resize(M * ib);
      u.resize(M * ib);
      const char* we = gu_base + e * gate_up.stride(0) * el;
      const int64_t ldw = gate_up.stride(1);
      if (wb) {
        auto* w = reinterpret_cast<const bf16*>(we);
        dot_range<bf16>(isa, w + i0 * ldw, ldw, 0, ib, xe, M, D, g.data(), ib);
        dot_range<bf16>(isa, w + (I + i0) * ldw, ldw, 0, ib, xe, M, D, u.data(), ib);
      } else {
        auto* w = reinterpret_cast<const float*>(we);
        dot_range<float>(isa, w + i0 * ldw, ldw, 0, ib, xe, M, D, g.data(), ib);
        dot_range<float>(isa, w + (I + i0) * ldw, ldw, 0, ib, xe, M, D, u.data(), ib);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < ib; ++i) {
          float gv = g[m * ib + i], uv = u[m * ib + i];
          int64_t at = (s0 + m) * I + i0 + i;
          if (wb) {
            float h = round_bf16(round_bf16(silu(round_bf16(gv))) * round_bf16(uv));
            if (hrows) hh[at] = float_to_bf16(h);
            else hf[at] = h;
          } else {
            hf[at] = silu(gv) * uv;
          }
        }
    }
  });

  // phase 2: y [A, D] = down_e . h, in blocks of 16 output rows per expert
  const int64_t DB = block_rows(D, n_active, threads);
  const int64_t d_blocks = (D + DB - 1) / DB;
  std::vector<float> y(A * D);
  Rows hr = strided_rows(hrows ? nullptr : hf.data(), hrows ? hh.data() : nullptr, A, I);
  const char* dn_base = reinterpret_cast<const char*>(down.data_ptr());
  parallel_chunks(n_active * d_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t e = active[t / d_blocks], d0 = (t % d_blocks) * DB, db = std::min(DB, D - d0);
      int64_t s0 = count[e], M = count[e + 1] - s0;
      Rows he;
      if (hrows) he.h.assign(hr.h.begin() + s0, hr.h.begin() + s0 + M);
      else he.f.assign(hr.f.begin() + s0, hr.f.begin() + s0 + M);
      const char* we = dn_base + e * down.stride(0) * el;
      const int64_t ldw = down.stride(1);
      float* yb = y.data() + s0 * D + d0;
      if (wb) dot_range<bf16>(isa, reinterpret_cast<const bf16*>(we) + d0 * ldw, ldw, 0, db, he, M, I, yb, D);
      else dot_range<float>(isa, reinterpret_cast<const float*>(we) + d0 * ldw, ldw, 0, db, he, M, I, yb, D);
    }
  });

  // phase 3: each row's weighted sum over its choices, in choice order
  at::parallel_for(0, N, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> acc(D);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < K; ++k) {
        int64_t s = slot_of[r * K + k];
        if (s < 0) continue;
        float wk = wp[r * K + k];
        const float* ys = y.data() + s * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += wk * (wb ? round_bf16(ys[d]) : ys[d]);
      }
      float* o = out + r * D;
      for (int64_t d = 0; d < D; ++d) o[d] = round_out ? round_bf16(acc[d]) : acc[d];
    }
  });
}

// The tensor form of moe_rows (dsv2_cpu::moe): hidden [N, D], expert_ids / weights [N, K]
// -> [N, D] in hidden's dtype.
at::Tensor moe(const at::Tensor& hidden, const at::Tensor& expert_ids, const at::Tensor& weights,
               const at::Tensor& gate_up, const at::Tensor& down, int64_t start) {
  check_weight(gate_up, 3, "gate_up");
  check_weight(down, 3, "down");
  TORCH_CHECK(gate_up.scalar_type() == down.scalar_type(), "gate_up and down differ in dtype");
  TORCH_CHECK(hidden.dim() == 2 && expert_ids.dim() == 2 && weights.sizes() == expert_ids.sizes(),
              "hidden [N, D], expert_ids and weights [N, K] expected");
  const bool out_bf16 = hidden.scalar_type() == at::kBFloat16;
  TORCH_CHECK(out_bf16 || hidden.scalar_type() == at::kFloat, "hidden must be float32 or bfloat16");
  const int64_t N = hidden.size(0), D = hidden.size(1), K = expert_ids.size(1);
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == D && down.size(0) == E && down.size(1) == D && down.size(2) == I,
              "expert weight shapes do not match hidden size ", D);
  const int64_t isa = current_isa();
  auto ids = expert_ids.to(at::kLong).contiguous();
  auto wts = weights.to(at::kFloat).contiguous();
  at::Tensor xk;
  Rows x = make_rows(hidden, uses_bf16_rows(isa, gate_up.scalar_type() == at::kBFloat16), xk);
  auto out = at::empty({N, D}, hidden.options().dtype(at::kFloat));
  moe_rows(isa, x, N, D, ids.data_ptr<int64_t>(), wts.data_ptr<float>(), K, gate_up, down, start,
           out_bf16, out.data_ptr<float>());
  return out_bf16 ? out.to(at::kBFloat16) : out;
}

// ---- small fused ops of a decode step (one call instead of 4-7 eager ops each) ------------
// RMSNorm as model/norm.py defines it: float32 normalisation; in bf16 the normalised value
// is rounded to bf16 before the weight multiplies (and the product rounded again).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [T, D] with stride 1 along D");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), "rms_norm: weight [D]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight differ in dtype");
  const int64_t T = x.size(0), D = x.size(1), ld = x.stride(0);
  auto out = at::empty({T, D}, x.options());
  const bool bf = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == at::kFloat, "rms_norm: float32 or bfloat16");
  std::vector<float> row(D);
  for (int64_t t = 0; t < T; ++t) {
    if (bf) {
      auto* xr = reinterpret_cast<const bf16*>(x.data_ptr()) + t * ld;
      rms_norm_row(xr, reinterpret_cast<const bf16*>(w.data_ptr()), D, float(eps), row.data());
      auto* o = reinterpret_cast<bf16*>(out.data_ptr()) + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = float_to_bf16(row[d]);  // already rounded
    } else {
      rms_norm_row(x.data_ptr<float>() + t * ld, w.data_ptr<float>(), D, float(eps),
                   out.data_ptr<float>() + t * D);
    }
  }
  return out;
}

// Rotary embedding of adjacent pairs as model/rope.py's apply_rotary: x [T, H, dim] (any
// strides, stride 1 along dim), rot [T, dim/2] complex64 (shared by the H heads); computed
// in float32, the result in x's dtype, contiguous [T, H, dim].
at::Tensor rotary(const at::Tensor& x, const at::Tensor& rot) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary: x must be [T, H, dim], stride 1 along dim");
  TORCH_CHECK(rot.scalar_type() == at::kComplexFloat && rot.dim() == 2 && rot.is_contiguous() &&
                  rot.size(0) == x.size(0) && 2 * rot.size(1) == x.size(2),
              "rotary: rot must be contiguous complex64 [T, dim/2]");
  const int64_t T = x.size(0), H = x.size(1), P = rot.size(1);
  auto out = at::empty({T, H, 2 * P}, x.options());
  const float* rp = reinterpret_cast<const float*>(rot.data_ptr());
  const bool bf = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == at::kFloat, "rotary: float32 or bfloat16");
  std::vector<float> row(2 * P);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t off = t * x.stride(0) + h * x.stride(1);
      const int64_t o = (t * H + h) * 2 * P;
      if (bf) {
        rotary_pairs(reinterpret_cast<const bf16*>(x.data_ptr()) + off, rp + t * P * 2, P, true,
                     row.data());
        auto* op = reinterpret_cast<bf16*>(out.data_ptr()) + o;
        for (int64_t i = 0; i < 2 * P; ++i) op[i] = float_to_bf16(row[i]);  // already rounded
      } else {
        rotary_pairs(x.data_ptr<float>() + off, rp + t * P * 2, P, false, out.data_ptr<float>() + o);
      }
    }
  return out;
}

// ---- greedy sampling ------------------------------------------------------------------------
// The first index of the largest value in v[0, n), or of the first NaN when there is one
// (torch.max(dim=-1).indices' answer), in one pass whose branch is almost never taken: a
// 32000-wide row takes ~10 us, where torch's reduction took 20-130 us in the engine's step.
template <typename T>
int64_t first_max(const T* v, int64_t n) {
  float best = load_f(v);
  int64_t at = 0;
  if (best != best) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float x = load_f(v + i);
    if (!(x <= best)) {  // larger, or NaN
      if (x != x) return i;
      best = x;
      at = i;
    }
  }
  return at;
}

std::vector<int64_t> argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.stride(1) == 1,
              "argmax_rows: logits must be a [N, V] CPU tensor, stride 1 along V");
  TORCH_CHECK(logits.size(1) > 0, "argmax_rows: empty rows");
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  std::vector<int64_t> out(N);
  if (logits.scalar_type() == at::kBFloat16) {
    auto* p = reinterpret_cast<const bf16*>(logits.data_ptr());
    for (int64_t r = 0; r < N; ++r) out[r] = first_max(p + r * ld, V);
  } else {
    TORCH_CHECK(logits.scalar_type() == at::kFloat, "argmax_rows: float32 or bfloat16");
    const float* p = logits.data_ptr<float>();
    for (int64_t r = 0; r < N; ++r) out[r] = first_max(p + r * ld, V);
  }
  return out;
}

}  // namespace dsv2


TORCH_LIBRARY(dsv2_cpu, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def(
      "moe(Tensor hidden, Tensor expert_ids, Tensor weights, Tensor gate_up, Tensor down, "
      "int start) -> Tensor");
  // no tensor arguments: registered as catch-all kernels along with their schemas
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor rot) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> int[]");
  // whole layer halves of a decode step (dsv2_decode.cpp)
  m.def(
      "mla_decode(Tensor x, Tensor in_norm, float eps, Tensor qkv_a, Tensor? q_a_norm, "
      "Tensor? q_b, Tensor kv_a_norm, float lora_eps, Tensor w_uk_t, Tensor kv_b, Tensor o_proj, "
      "Tensor(a!) cache, Tensor slots, Tensor tables, Tensor lens, Tensor rot, int heads, "
      "int nope, int rope, int vdim, float scale) -> Tensor");
  m.def(
      "moe_decode(Tensor x, Tensor post_norm, float eps, Tensor gate_w, int top_k, int n_group, "
      "int topk_group, bool norm_topk_prob, float scaling, Tensor gate_up, Tensor down, "
      "int start, Tensor? shared_gate_up, Tensor? shared_down) -> Tensor");
  m.def("mlp_decode(Tensor x, Tensor post_norm, float eps, Tensor gate_up, Tensor down) -> Tensor");
  m.def("set_isa(int wanted) -> int", &dsv2::set_isa);
  m.def("get_isa() -> int", &dsv2::get_isa);
  m.def("cpu_max_isa() -> int", &dsv2::cpu_max_isa);
  m.def("parallel_threads() -> int", &dsv2::parallel_threads);
}

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {
  m.impl("linear", &dsv2::linear);
  m.impl("moe", &dsv2::moe);
  m.impl("rms_norm", &dsv2::rms_norm);
  m.impl("rotary", &dsv2::rotary);
  m.impl("argmax_rows", &dsv2::argmax_rows);
}

