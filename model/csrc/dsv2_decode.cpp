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
#include "dsv2_cpu.h"

#include <limits>
#include <optional>

namespace dsv2 {
namespace {

inline bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// the value the eager path stores: rounded to bf16 in a bf16 model
inline float stored(float v, bool bf) { return bf ? round_bf16(v) : v; }

// Row pointers into a [M, K] float32 or bf16 buffer with row stride ld, as Rows
Rows rows_of(const float* f, const bf16* h, int64_t M, int64_t ld) {
  Rows r;
  for (int64_t m = 0; m < M; ++m) {
    if (h != nullptr) r.h.push_back(h + m * ld);
    else r.f.push_back(f + m * ld);
  }
  return r;
}

// Float32 values into a tensor of `like`'s dtype (rounded to bf16 when it is bf16)
at::Tensor to_dtype_of(const std::vector<float>& v, at::IntArrayRef shape, const at::Tensor& like) {
  auto out = at::empty(shape, like.options());
  if (is_bf16(like)) {
    auto* o = reinterpret_cast<bf16*>(out.data_ptr());
    for (size_t i = 0; i < v.size(); ++i) o[i] = float_to_bf16(v[i]);
  } else {
    std::copy(v.begin(), v.end(), out.data_ptr<float>());
  }
  return out;
}

// Absorbed MLA for B decode rows over their cached context:
// q [B, H, dn + dr] (q_pe roped), cache [num_blocks, bs, r + dr], tables [B, nb],
// lens [B], w_uk_t [H, r, dn] (W_UK transposed per head), kv_b [H * (dn + dv), r]
// -> [B, H * dv] in q's dtype.
at::Tensor absorbed_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                              const at::Tensor& lens, const at::Tensor& w_uk_t,
                              const at::Tensor& kv_b, int64_t dv, double scale) {
  const int64_t B = q.size(0), H = q.size(1), dq = q.size(2);
  const int64_t r = w_uk_t.size(1), dn = w_uk_t.size(2), dr = dq - dn;
  const int64_t bs = cache.size(1), width = cache.size(2), nb = tables.size(1);
  TORCH_CHECK(width == r + dr, "mla_decode: cache rows hold ", width, " values, expected ", r + dr);
  TORCH_CHECK(kv_b.size(0) == H * (dn + dv) && kv_b.size(1) == r, "mla_decode: kv_b shape");
  const bool bf = is_bf16(q);
  const int64_t isa = current_isa();
  const bool hrows = uses_bf16_rows(isa, bf);
  auto tab = tables.contiguous();
  auto len = lens.contiguous();
  const int64_t* tp = tab.data_ptr<int64_t>();
  const int64_t* lp = len.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= nb * bs, "mla_decode: context length ", lp[b],
                " outside the row's ", nb, " blocks");

  // q as the rows the dot products read (float32, or bf16 for vdpbf16ps)
  at::Tensor qk = hrows ? q.contiguous() : q.to(at::kFloat).contiguous();
  const float* qf = hrows ? nullptr : qk.data_ptr<float>();
  const bf16* qh = hrows ? reinterpret_cast<const bf16*>(qk.data_ptr()) : nullptr;

  // q_latent [B, H, r] = q_nope . W_UK, head by head (each head's W_UK read once for all rows)
  std::vector<float> qlat(B * H * r);
  const char* wuk = reinterpret_cast<const char*>(w_uk_t.data_ptr());
  const int64_t el = bf ? 2 : 4;
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      Rows x = rows_of(qf ? qf + h * dq : nullptr, qh ? qh + h * dq : nullptr, B, H * dq);
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
        qrows = rows_of(nullptr, qfull_h.data(), H, width);
      } else {
        qfull_f.resize(H * width);
        for (int64_t h = 0; h < H; ++h) {
          std::copy_n(qlat.data() + (b * H + h) * r, r, qfull_f.data() + h * width);
          std::copy_n(qf + (b * H + h) * dq + dn, dr, qfull_f.data() + h * width + r);
        }
        qrows = rows_of(qfull_f.data(), nullptr, H, width);
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
  std::vector<float> o(B * H * dv);
  const char* kvb = reinterpret_cast<const char*>(kv_b.data_ptr());
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      Rows x = rows_of(hrows ? nullptr : olat.data() + h * r, hrows ? olat_h.data() + h * r : nullptr, B, H * r);
      const char* w = kvb + (h * (dn + dv) + dn) * r * el;
      if (bf) dot_range<bf16>(isa, reinterpret_cast<const bf16*>(w), r, 0, dv, x, B, r, o.data() + h * dv, H * dv);
      else dot_range<float>(isa, reinterpret_cast<const float*>(w), r, 0, dv, x, B, r, o.data() + h * dv, H * dv);
    }
  });
  return to_dtype_of(o, {B, H * dv}, q);
}

// SwiGLU MLP of the eager path: down(silu(gate) * up), gate_up [2I, D], down [D, I]
at::Tensor mlp(const at::Tensor& h, const at::Tensor& gate_up, const at::Tensor& down) {
  auto gu = dsv2::linear(h, gate_up).contiguous();  // [B, 2I] in h's dtype
  const int64_t B = gu.size(0), I = gu.size(1) / 2;
  const bool bf = is_bf16(h);
  std::vector<float> a(B * I);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < I; ++i) {
      float g, u;
      if (bf) {
        auto* p = reinterpret_cast<const bf16*>(gu.data_ptr()) + b * 2 * I;
        g = bf16_to_float(p[i]);
        u = bf16_to_float(p[I + i]);
      } else {
        const float* p = gu.data_ptr<float>() + b * 2 * I;
        g = p[i];
        u = p[I + i];
      }
      a[b * I + i] = stored(stored(silu(g), bf) * u, bf);
    }
  return dsv2::linear(to_dtype_of(a, {B, I}, h), down);
}

// Router of the eager path (model/moe.py MoEGate, softmax scoring): logits in float32,
// softmax, the top_k experts (of the topk_group best groups when n_group > 1), weights
// normalised or scaled -> expert ids [B, K] int64, weights [B, K] float32
std::pair<at::Tensor, at::Tensor> route(const at::Tensor& h, const at::Tensor& gate_w, int64_t top_k,
                                        int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                        double scaling) {
  auto logits = dsv2::linear(h.to(at::kFloat), gate_w).contiguous();  // [B, E] float32
  const int64_t B = logits.size(0), E = logits.size(1), per_group = E / n_group;
  auto ids = at::empty({B, top_k}, h.options().dtype(at::kLong));
  auto wts = at::empty({B, top_k}, h.options().dtype(at::kFloat));
  std::vector<float> s(E);
  std::vector<int64_t> order(E), gorder(n_group);
  std::vector<float> gmax(n_group);
  for (int64_t b = 0; b < B; ++b) {
    const float* lg = logits.data_ptr<float>() + b * E;
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
    int64_t* ip = ids.data_ptr<int64_t>() + b * top_k;
    float* wp = wts.data_ptr<float>() + b * top_k;
    float total = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      ip[k] = order[k];
      wp[k] = s[order[k]];
      total += wp[k];
    }
    for (int64_t k = 0; k < top_k; ++k)
      wp[k] = (top_k > 1 && norm_topk_prob) ? wp[k] / (total + 1e-20f) : wp[k] * float(scaling);
  }
  return {ids, wts};
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
  auto h = dsv2::rms_norm(x, in_norm, eps);
  auto y = dsv2::linear(h, qkv_a);  // [B, nq + r + dr]
  const int64_t nq = y.size(1) - r - rope;
  at::Tensor q = y.narrow(1, 0, nq);
  if (q_b.has_value()) q = dsv2::linear(dsv2::rms_norm(q, *q_a_norm, lora_eps), *q_b);  // [B, H * dq]
  TORCH_CHECK(q.size(1) == heads * dq, "mla_decode: q has ", q.size(1), " columns, expected ",
              heads * dq);
  auto latent = dsv2::rms_norm(y.narrow(1, nq, r), kv_a_norm, lora_eps);  // [B, r]
  auto k_pe = dsv2::rotary(y.narrow(1, nq + r, rope).unsqueeze(1), rot);   // [B, 1, dr]
  auto q3 = q.contiguous().view({B, heads, dq});
  auto q_pe = dsv2::rotary(q3.narrow(2, nope, rope), rot);  // [B, H, dr]
  q3 = at::cat(std::vector<at::Tensor>{q3.narrow(2, 0, nope), q_pe}, 2);     // [B, H, dq], q_pe roped

  // this step's latents into their slots
  auto flat = cache.view({-1, cache.size(2)});
  auto entry = at::cat(std::vector<at::Tensor>{latent, k_pe.view({B, rope})}, 1);  // [B, r + dr]
  flat.index_copy_(0, slots, entry);

  auto o = absorbed_attention(q3, cache, tables, lens, w_uk_t, kv_b, vdim, scale);  // [B, H*dv]
  return x + dsv2::linear(o, o_proj);
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
  auto h = dsv2::rms_norm(x, post_norm, eps);
  auto [ids, wts] = route(h, gate_w, top_k, n_group, topk_group, norm_topk_prob, scaling);
  auto out = dsv2::moe(h, ids, wts, gate_up, down, start);
  if (shared_gate_up.has_value()) out = out + mlp(h, *shared_gate_up, *shared_down);
  return x + out;
}

// x [B, D] -> x + MLP(post_attention_layernorm(x)) (the dense layers)
at::Tensor mlp_decode(const at::Tensor& x, const at::Tensor& post_norm, double eps,
                      const at::Tensor& gate_up, const at::Tensor& down) {
  check_rows(x, "mlp_decode");
  return x + mlp(dsv2::rms_norm(x, post_norm, eps), gate_up, down);
}

}  // namespace dsv2

TORCH_LIBRARY_IMPL(dsv2_cpu, CPU, m) {
  m.impl("mla_decode", &dsv2::mla_decode);
  m.impl("moe_decode", &dsv2::moe_decode);
  m.impl("mlp_decode", &dsv2::mlp_decode);
}
