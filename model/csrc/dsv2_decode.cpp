// Fused decode layers (model/fused_decode.py calls these): a decode-only step of a few rows
// runs each decoder layer as two C++ calls instead of ~50 eager ops, so a small model's step
// is no longer bound by per-op dispatch and Python.
//  - dsv2_cpu::mla_decode: x + MLA(input_layernorm(x)) over the paged latent cache, in the
//    absorbed form (model/attention.py's DeepseekV2Attention._decode), writing each row's
//    latent into its cache slot;
//  - dsv2_cpu::moe_decode: x + MoE(post_attention_layernorm(x)): the router (softmax scores,
//    greedy or group-limited top-k), the routed experts (dsv2_cpu::moe) and the shared ones;
//  - dsv2_cpu::mlp_decode: x + MLP(post_attention_layernorm(x)) for the dense layers.
// The arithmetic is the eager path's: float32 accumulation, and in bfloat16 every value is
// rounded where the eager ops store a bf16 tensor, so the two agree up to summation order.
// Between the weight products no ATen op runs: a call's intermediates are a few rows of
// float32 values in plain buffers (`Block`), and only its output is a new tensor. At one
// decode row the ~15 small ATen ops a layer half used to run (casts, cat, index_copy_, adds
// and their allocations) cost about as much as reading an attention layer's weights.
#include "dsv2_cpu.h"

#include <limits>
#include <optional>

namespace dsv2 {
namespace {

inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// A few rows of values as float32, [rows, cols] row-major. In a bf16 model every value is
// already rounded to bf16 (what the eager tensor would hold), so the bf16 copy the
// vdpbf16ps path reads is exact.
struct Block {
  int64_t rows = 0, cols = 0;
  std::vector<float> v;
  std::vector<bf16> h;  // bf16 copy of the columns a product reads (rows_of)

  void resize(int64_t r, int64_t c) {
    rows = r;
    cols = c;
    v.resize(r * c);
  }
  float* row(int64_t m) { return v.data() + m * cols; }
  const float* row(int64_t m) const { return v.data() + m * cols; }
};

// x [B, D] (float32 or bf16, contiguous) as a Block
Block block_of(const at::Tensor& x) {
  Block b;
  b.resize(x.size(0), x.size(1));
  if (is_bf16(x)) {
    auto* p = reinterpret_cast<const bf16*>(x.data_ptr());
    for (size_t i = 0; i < b.v.size(); ++i) b.v[i] = bf16_to_float(p[i]);
  } else {
    std::copy_n(x.data_ptr<float>(), b.v.size(), b.v.data());
  }
  return b;
}

// Columns [c0, c0 + K) of b's rows as the products read them: float32 pointers into b, or
// pointers into a bf16 copy (made here, in b.h) when the path reads bf16 rows
Rows rows_of(Block& b, int64_t c0, int64_t K, bool hrows) {
  if (!hrows) return strided_rows(b.v.data() + c0, nullptr, b.rows, b.cols);
  b.h.resize(b.rows * K);
  for (int64_t m = 0; m < b.rows; ++m)
    for (int64_t k = 0; k < K; ++k) b.h[m * K + k] = float_to_bf16(b.row(m)[c0 + k]);
  return strided_rows(nullptr, b.h.data(), b.rows, K);
}

// y [M, N] = columns [c0, c0 + K) of x . w^T for w [N, K] (float32 or bf16, row-major),
// rounded to bf16 when round_out (a bf16 model's linear output)
void product(int64_t isa, Block& x, int64_t c0, const at::Tensor& w, bool round_out, Block& y) {
  const int64_t M = x.rows, N = w.size(0), K = w.size(1);
  TORCH_CHECK(c0 + K <= x.cols, "fused decode: a weight reads ", K, " columns, the rows have ",
              x.cols - c0);
  Rows rows = rows_of(x, c0, K, uses_bf16_rows(isa, is_bf16(w)));
  y.resize(M, N);
  product_rows(isa, rows, M, w, y.v.data());
  if (round_out)
    for (auto& v : y.v) v = round_bf16(v);
}

// RMSNorm (rms_norm_row, as dsv2::rms_norm) of columns [c0, c0 + D) of x, D = w's size -> out
void rms_norm_into(const Block& x, int64_t c0, const at::Tensor& w, double eps, bool bf,
                   Block& out) {
  const int64_t D = w.size(0);
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && is_bf16(w) == bf && c0 + D <= x.cols,
              "fused decode: a norm weight does not match its rows");
  out.resize(x.rows, D);
  for (int64_t m = 0; m < x.rows; ++m) {
    if (bf) rms_norm_row(x.row(m) + c0, reinterpret_cast<const bf16*>(w.data_ptr()), D, float(eps), out.row(m));
    else rms_norm_row(x.row(m) + c0, w.data_ptr<float>(), D, float(eps), out.row(m));
  }
}

// Rotary embedding in place (rotary_pairs, as dsv2::rotary) of `heads` groups of `dim`
// columns per row, the first at column c0 and each `stride` columns after the last; row m
// turns by rot[m] (rot: complex64 [rows, dim / 2])
void rotate(Block& x, int64_t c0, int64_t heads, int64_t stride, int64_t dim, const at::Tensor& rot,
            bool bf) {
  TORCH_CHECK(rot.scalar_type() == at::kComplexFloat && rot.dim() == 2 && rot.is_contiguous() &&
                  rot.size(0) == x.rows && 2 * rot.size(1) == dim,
              "fused decode: rot must be contiguous complex64 [rows, ", dim / 2, "]");
  const float* rp = reinterpret_cast<const float*>(rot.data_ptr());
  for (int64_t m = 0; m < x.rows; ++m)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x.row(m) + c0 + h * stride;
      rotary_pairs(v, rp + m * dim, dim / 2, bf, v);
    }
}

// out = stored(x + y) as a new tensor of x's dtype and shape (the residual add)
at::Tensor residual(const at::Tensor& x, const Block& xin, const Block& y) {
  auto out = at::empty(x.sizes(), x.options());
  const bool bf = is_bf16(x);
  if (bf) {
    auto* o = reinterpret_cast<bf16*>(out.data_ptr());
    for (size_t i = 0; i < xin.v.size(); ++i) o[i] = float_to_bf16(xin.v[i] + y.v[i]);
  } else {
    float* o = out.data_ptr<float>();
    for (size_t i = 0; i < xin.v.size(); ++i) o[i] = xin.v[i] + y.v[i];
  }
  return out;
}

// Absorbed MLA for B decode rows over their cached context:
// q [B, H * (dn + dr)] (q_pe roped), cache [num_blocks, bs, r + dr], tables [B, nb],
// lens [B], w_uk_t [H, r, dn] (W_UK transposed per head), kv_b [H * (dn + dv), r]
// -> o [B, H * dv].
void absorbed_attention(int64_t isa, const Block& q, int64_t H, const at::Tensor& cache,
                        const at::Tensor& tables, const at::Tensor& lens,
                        const at::Tensor& w_uk_t, const at::Tensor& kv_b, int64_t dv,
                        double scale, bool bf, Block& o) {
  const int64_t B = q.rows, dq = q.cols / H;
  const int64_t r = w_uk_t.size(1), dn = w_uk_t.size(2), dr = dq - dn;
  const int64_t bs = cache.size(1), width = cache.size(2), nb = tables.size(1);
  TORCH_CHECK(width == r + dr, "mla_decode: cache rows hold ", width, " values, expected ", r + dr);
  TORCH_CHECK(kv_b.size(0) == H * (dn + dv) && kv_b.size(1) == r, "mla_decode: kv_b shape");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.is_contiguous() &&
                  lens.scalar_type() == at::kLong && lens.is_contiguous(),
              "mla_decode: tables and lens must be contiguous int64");
  const bool hrows = uses_bf16_rows(isa, bf);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t num_blocks = cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= nb * bs, "mla_decode: context length ", lp[b],
                " outside the row's ", nb, " blocks");
    for (int64_t j = 0; j < (lp[b] + bs - 1) / bs; ++j)
      TORCH_CHECK(tp[b * nb + j] >= 0 && tp[b * nb + j] < num_blocks, "mla_decode: block ",
                  tp[b * nb + j], " outside the cache");
  }

  // q as the rows the dot products read (float32, or a bf16 copy for vdpbf16ps)
  const float* qf = q.v.data();
  std::vector<bf16> qh_store;
  if (hrows) {
    qh_store.resize(q.v.size());
    for (size_t i = 0; i < q.v.size(); ++i) qh_store[i] = float_to_bf16(q.v[i]);
  }
  const bf16* qh = hrows ? qh_store.data() : nullptr;

  // q_latent [B, H, r] = q_nope . W_UK, head by head (each head's W_UK read once for all rows)
  std::vector<float> qlat(B * H * r);
  const char* wuk = reinterpret_cast<const char*>(w_uk_t.data_ptr());
  const int64_t el = bf ? 2 : 4;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      Rows x = strided_rows(qh ? nullptr : qf + h * dq, qh ? qh + h * dq : nullptr, B, H * dq);
      const char* w = wuk + h * r * dn * el;
      if (bf) dot_range<bf16>(isa, reinterpret_cast<const bf16*>(w), dn, 0, r, x, B, dn, qlat.data() + h * r, H * r);
      else dot_range<float>(isa, reinterpret_cast<const float*>(w), dn, 0, r, x, B, dn, qlat.data() + h * r, H * r);
    }
  });
  if (bf)
    for (auto& v : qlat) v = round_bf16(v);

  // per row: scores over its context, softmax, probability-weighted latents -> olat [B, H, r]
  std::vector<float> olat(B * H * r, 0.0f);
  const char* cbase = reinterpret_cast<const char*>(cache.data_ptr());
  const int64_t block_elems = bs * width;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> qfull_f, scores;
    std::vector<bf16> qfull_h;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t L = lp[b];
      // the query rows: cat(q_latent, q_pe) per head, in the layout of a cache row
      Rows qrows;
      if (hrows) {
        qfull_h.resize(H * width);
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t j = 0; j < r; ++j) qfull_h[h * width + j] = float_to_bf16(qlat[(b * H + h) * r + j]);
          for (int64_t j = 0; j < dr; ++j) qfull_h[h * width + r + j] = qh[(b * H + h) * dq + dn + j];
        }
        qrows = strided_rows(nullptr, qfull_h.data(), H, width);
      } else {
        qfull_f.resize(H * width);
        for (int64_t h = 0; h < H; ++h) {
          std::copy_n(qlat.data() + (b * H + h) * r, r, qfull_f.data() + h * width);
          std::copy_n(qf + (b * H + h) * dq + dn, dr, qfull_f.data() + h * width + r);
        }
        qrows = strided_rows(qfull_f.data(), nullptr, H, width);
      }
      scores.assign(H * L, 0.0f);
      const int64_t blocks = (L + bs - 1) / bs;
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t n = std::min(bs, L - j * bs);
        const char* blk = cbase + tp[b * nb + j] * block_elems * el;
        if (bf) dot_range<bf16>(isa, reinterpret_cast<const bf16*>(blk), width, 0, n, qrows, H, width, scores.data() + j * bs, L);
        else dot_range<float>(isa, reinterpret_cast<const float*>(blk), width, 0, n, qrows, H, width, scores.data() + j * bs, L);
      }
      for (int64_t h = 0; h < H; ++h) {  // softmax in float32 of the stored scores
        float* s = scores.data() + h * L;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t l = 0; l < L; ++l) {
          s[l] = stored(float(scale) * s[l], bf);
          mx = std::max(mx, s[l]);
        }
        float sum = 0.0f;
        for (int64_t l = 0; l < L; ++l) {
          s[l] = std::exp(s[l] - mx);
          sum += s[l];
        }
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < L; ++l) s[l] = stored(s[l] * inv, bf);
      }
      float* ob = olat.data() + b * H * r;
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t n = std::min(bs, L - j * bs);
        const char* blk = cbase + tp[b * nb + j] * block_elems * el;
        if (bf) weighted_rows<bf16>(isa, scores.data() + j * bs, L, H, reinterpret_cast<const bf16*>(blk), width, n, r, ob, r);
        else weighted_rows<float>(isa, scores.data() + j * bs, L, H, reinterpret_cast<const float*>(blk), width, n, r, ob, r);
      }
      if (bf)
        for (int64_t i = 0; i < H * r; ++i) ob[i] = round_bf16(ob[i]);
    }
  });

  // o [B, H, dv] = olat . W_UV per head (W_UV: rows dn.. dn + dv of the head's kv_b block)
  std::vector<bf16> olat_h;
  if (hrows) {
    olat_h.resize(olat.size());
    for (size_t i = 0; i < olat.size(); ++i) olat_h[i] = float_to_bf16(olat[i]);
  }
  o.resize(B, H * dv);
  float* op = o.v.data();
  const char* kvb = reinterpret_cast<const char*>(kv_b.data_ptr());
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      Rows x = strided_rows(hrows ? nullptr : olat.data() + h * r,
                            hrows ? olat_h.data() + h * r : nullptr, B, H * r);
      const char* w = kvb + (h * (dn + dv) + dn) * r * el;
      if (bf) dot_range<bf16>(isa, reinterpret_cast<const bf16*>(w), r, 0, dv, x, B, r, op + h * dv, H * dv);
      else dot_range<float>(isa, reinterpret_cast<const float*>(w), r, 0, dv, x, B, r, op + h * dv, H * dv);
    }
  });
  if (bf)
    for (auto& v : o.v) v = round_bf16(v);
}

// SwiGLU MLP of the eager path: down(silu(gate) * up), gate_up [2I, D], down [D, I]
void mlp_into(int64_t isa, Block& h, const at::Tensor& gate_up, const at::Tensor& down, bool bf,
              Block& out) {
  Block gu, a;
  product(isa, h, 0, gate_up, bf, gu);  // [B, 2I]
  const int64_t I = gu.cols / 2;
  a.resize(h.rows, I);
  for (int64_t b = 0; b < h.rows; ++b) {
    const float* g = gu.row(b);
    float* ab = a.row(b);
    for (int64_t i = 0; i < I; ++i) ab[i] = stored(stored(silu(g[i]), bf) * g[I + i], bf);
  }
  product(isa, a, 0, down, bf, out);
}

// Router of the eager path (model/moe.py MoEGate, softmax scoring) from float32 logits
// [B, E]: softmax, the top_k experts (of the topk_group best groups when n_group > 1),
// weights normalised or scaled -> ids / wts [B, top_k]
void route(const Block& logits, int64_t top_k, int64_t n_group, int64_t topk_group,
           bool norm_topk_prob, double scaling, std::vector<int64_t>& ids,
           std::vector<float>& wts) {
  const int64_t B = logits.rows, E = logits.cols, per_group = E / n_group;
  ids.resize(B * top_k);
  wts.resize(B * top_k);
  std::vector<float> s(E);
  std::vector<int64_t> order(E), gorder(n_group);
  std::vector<float> gmax(n_group);
  for (int64_t b = 0; b < B; ++b) {
    const float* lg = logits.row(b);
    const float mx = *std::max_element(lg, lg + E);
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(lg[e] - mx));
    for (int64_t e = 0; e < E; ++e) s[e] /= sum;
    if (n_group > 1) {  // experts outside the topk_group best groups score 0.0, as eager does
      for (int64_t g = 0; g < n_group; ++g)
        gmax[g] = *std::max_element(s.begin() + g * per_group, s.begin() + (g + 1) * per_group);
      for (int64_t g = 0; g < n_group; ++g) gorder[g] = g;
      std::partial_sort(gorder.begin(), gorder.begin() + topk_group, gorder.end(),
                        [&](int64_t a, int64_t c) { return gmax[a] > gmax[c] || (gmax[a] == gmax[c] && a < c); });
      std::vector<bool> keep(n_group, false);
      for (int64_t g = 0; g < topk_group; ++g) keep[gorder[g]] = true;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per_group]) s[e] = 0.0f;
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int64_t a, int64_t c) { return s[a] > s[c] || (s[a] == s[c] && a < c); });
    int64_t* ip = ids.data() + b * top_k;
    float* wp = wts.data() + b * top_k;
    float total = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      ip[k] = order[k];
      wp[k] = s[order[k]];
      total += wp[k];
    }
    for (int64_t k = 0; k < top_k; ++k)
      wp[k] = (top_k > 1 && norm_topk_prob) ? wp[k] / (total + 1e-20f) : wp[k] * float(scaling);
  }
}

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous [B, D] CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": float32 or bfloat16");
}

}  // namespace

// x [B, D] -> x + attention(input_layernorm(x)) for B decode rows (see the file comment);
// writes each row's cat(latent, k_pe) into cache slot slots[b].
at::Tensor mla_decode(const at::Tensor& x, const at::Tensor& in_norm, double eps,
                      const at::Tensor& qkv_a, const std::optional<at::Tensor>& q_a_norm,
                      const std::optional<at::Tensor>& q_b, const at::Tensor& kv_a_norm,
                      double lora_eps, const at::Tensor& w_uk_t, const at::Tensor& kv_b,
                      const at::Tensor& o_proj, const at::Tensor& cache, const at::Tensor& slots,
                      const at::Tensor& tables, const at::Tensor& lens, const at::Tensor& rot,
                      int64_t heads, int64_t nope, int64_t rope, int64_t vdim, double scale) {
  check_rows(x, "mla_decode");
  TORCH_CHECK(cache.scalar_type() == x.scalar_type() && cache.dim() == 3 && cache.is_contiguous(),
              "mla_decode: cache must be a contiguous [blocks, block_size, r + dr] of x's dtype");
  const int64_t B = x.size(0), r = w_uk_t.size(1), dq = nope + rope;
  TORCH_CHECK(slots.numel() == B && tables.size(0) == B && lens.numel() == B,
              "mla_decode: slots, tables and lens need one entry per row");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "mla_decode: slots must be contiguous int64");
  const bool bf = is_bf16(x);
  const int64_t isa = current_isa();
  Block xin = block_of(x), h, y, q, latent, o, proj;
  rms_norm_into(xin, 0, in_norm, eps, bf, h);
  product(isa, h, 0, qkv_a, bf, y);  // [B, nq + r + dr]: q (or q_a), latent, k_pe
  const int64_t nq = y.cols - r - rope;
  if (q_b.has_value()) {  // q_lora: q = q_b(q_a_layernorm(q_a))
    Block qa;
    rms_norm_into(y, 0, *q_a_norm, lora_eps, bf, qa);
    product(isa, qa, 0, *q_b, bf, q);
  } else {
    q.resize(B, nq);
    for (int64_t b = 0; b < B; ++b) std::copy_n(y.row(b), nq, q.row(b));
  }
  TORCH_CHECK(q.cols == heads * dq, "mla_decode: q has ", q.cols, " columns, expected ", heads * dq);
  rms_norm_into(y, nq, kv_a_norm, lora_eps, bf, latent);  // [B, r]
  rotate(y, nq + r, 1, 0, rope, rot, bf);                 // k_pe, in place
  rotate(q, nope, heads, dq, rope, rot, bf);              // each head's q_pe, in place

  // this step's latents into their slots: cat(latent, k_pe)
  const int64_t width = cache.size(2), capacity = cache.size(0) * cache.size(1);
  TORCH_CHECK(width == r + rope, "mla_decode: cache rows hold ", width, " values, expected ", r + rope);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < capacity, "mla_decode: slot ", sp[b], " outside the cache");
    const float* kpe = y.row(b) + nq + r;
    if (bf) {
      auto* c = reinterpret_cast<bf16*>(cache.data_ptr()) + sp[b] * width;
      for (int64_t j = 0; j < r; ++j) c[j] = float_to_bf16(latent.row(b)[j]);
      for (int64_t j = 0; j < rope; ++j) c[r + j] = float_to_bf16(kpe[j]);
    } else {
      float* c = cache.data_ptr<float>() + sp[b] * width;
      std::copy_n(latent.row(b), r, c);
      std::copy_n(kpe, rope, c + r);
    }
  }

  absorbed_attention(isa, q, heads, cache, tables, lens, w_uk_t, kv_b, vdim, scale, bf, o);
  product(isa, o, 0, o_proj, bf, proj);
  return residual(x, xin, proj);
}

// x [B, D] -> x + MoE(post_attention_layernorm(x)) (softmax router; routed + shared experts)
at::Tensor moe_decode(const at::Tensor& x, const at::Tensor& post_norm, double eps,
                      const at::Tensor& gate_w, int64_t top_k, int64_t n_group, int64_t topk_group,
                      bool norm_topk_prob, double scaling, const at::Tensor& gate_up,
                      const at::Tensor& down, int64_t start,
                      const std::optional<at::Tensor>& shared_gate_up,
                      const std::optional<at::Tensor>& shared_down) {
  check_rows(x, "moe_decode");
  TORCH_CHECK(gate_w.scalar_type() == at::kFloat, "moe_decode: the router weight must be float32");
  TORCH_CHECK(n_group >= 1 && gate_w.size(0) % n_group == 0 && topk_group >= 1 &&
                  topk_group <= n_group && top_k >= 1 && top_k <= gate_w.size(0),
              "moe_decode: bad routing parameters");
  check_weight(gate_up, 3, "gate_up");
  check_weight(down, 3, "down");
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(gate_up.size(2) == D && down.size(0) == gate_up.size(0) && down.size(1) == D &&
                  down.size(2) * 2 == gate_up.size(1) &&
                  gate_up.scalar_type() == down.scalar_type(),
              "moe_decode: expert weight shapes do not match hidden size ", D);
  const bool bf = is_bf16(x);
  const int64_t isa = current_isa();
  Block xin = block_of(x), h, logits, routed;
  rms_norm_into(xin, 0, post_norm, eps, bf, h);
  product(isa, h, 0, gate_w, false, logits);  // [B, E] float32: the router runs in float32
  std::vector<int64_t> ids;
  std::vector<float> wts;
  route(logits, top_k, n_group, topk_group, norm_topk_prob, scaling, ids, wts);
  Rows hr = rows_of(h, 0, D, uses_bf16_rows(isa, is_bf16(gate_up)));
  routed.resize(B, D);
  moe_rows(isa, hr, B, D, ids.data(), wts.data(), top_k, gate_up, down, start, bf, routed.v.data());
  if (shared_gate_up.has_value()) {
    Block shared;
    mlp_into(isa, h, *shared_gate_up, *shared_down, bf, shared);
    for (size_t i = 0; i < routed.v.size(); ++i) routed.v[i] = stored(routed.v[i] + shared.v[i], bf);
  }
  return residual(x, xin, routed);
}

// x [B, D] -> x + MLP(post_attention_layernorm(x)) (the dense layers)
at::Tensor mlp_decode(const at::Tensor& x, const at::Tensor& post_norm, double eps,
                      const at::Tensor& gate_up, const at::Tensor& down) {
  check_rows(x, "mlp_decode");
  const bool bf = is_bf16(x);
  const int64_t isa = current_isa();
  Block xin = block_of(x), h, m;
  rms_norm_into(xin, 0, post_norm, eps, bf, h);
  mlp_into(isa, h, gate_up, down, bf, m);
  return residual(x, xin, m);
}

}  // namespace dsv2

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {
  m.impl("mla_decode", &dsv2::mla_decode);
  m.impl("moe_decode", &dsv2::moe_decode);
  m.impl("mlp_decode", &dsv2::mlp_decode);
}
