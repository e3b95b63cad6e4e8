// dsv2_cpu::DecodePlan: every decoder layer of a decode-only step in one call.
//
// model/fused_decode.py binds each layer's weights into two C++ calls (dsv2_decode.cpp), but
// calling them from Python still costs a Python call and an op dispatch that converts every
// argument (about 20 of them) each time, 16 times a step on an 8-layer model: at one decode
// row that was about as long as the attention kernels themselves. A plan holds the same
// bound arguments for all layers, added once from Python (add_mla / add_moe / add_mlp, in
// layer order), and `run` chains the layer halves in C++.
#include "dsv2_cpu.h"

#include <optional>

namespace dsv2 {

namespace {

struct MlaArgs {  // dsv2::mla_decode's arguments other than the step's
  at::Tensor in_norm;
  double eps;
  at::Tensor qkv_a;
  std::optional<at::Tensor> q_a_norm, q_b;
  at::Tensor kv_a_norm;
  double lora_eps;
  at::Tensor w_uk_t, kv_b, o_proj, cache;
  int64_t heads, nope, rope, vdim;
  double scale;
};

struct FfnArgs {  // dsv2::moe_decode's (moe) or dsv2::mlp_decode's arguments but x
  bool moe;
  at::Tensor norm;
  double eps;
  at::Tensor gate_w;
  int64_t top_k, n_group, topk_group;
  bool norm_topk_prob;
  double scaling;
  at::Tensor gate_up, down;
  int64_t start;
  std::optional<at::Tensor> shared_gate_up, shared_down;
};

}  // namespace

struct DecodePlan : torch::CustomClassHolder {
  std::vector<MlaArgs> attention;
  std::vector<FfnArgs> ffn;

  void add_mla(at::Tensor in_norm, double eps, at::Tensor qkv_a, std::optional<at::Tensor> q_a_norm,
               std::optional<at::Tensor> q_b, at::Tensor kv_a_norm, double lora_eps,
               at::Tensor w_uk_t, at::Tensor kv_b, at::Tensor o_proj, at::Tensor cache,
               int64_t heads, int64_t nope, int64_t rope, int64_t vdim, double scale) {
    TORCH_CHECK(attention.size() == ffn.size(), "DecodePlan: add a layer's attention, then its MLP");
    attention.push_back({in_norm, eps, qkv_a, q_a_norm, q_b, kv_a_norm, lora_eps, w_uk_t, kv_b,
                         o_proj, cache, heads, nope, rope, vdim, scale});
  }

  void add_moe(at::Tensor post_norm, double eps, at::Tensor gate_w, int64_t top_k,
               int64_t n_group, int64_t topk_group, bool norm_topk_prob, double scaling,
               at::Tensor gate_up, at::Tensor down, int64_t start,
               std::optional<at::Tensor> shared_gate_up, std::optional<at::Tensor> shared_down) {
    TORCH_CHECK(attention.size() == ffn.size() + 1, "DecodePlan: add a layer's attention first");
    ffn.push_back({true, post_norm, eps, gate_w, top_k, n_group, topk_group, norm_topk_prob,
                   scaling, gate_up, down, start, shared_gate_up, shared_down});
  }

  void add_mlp(at::Tensor post_norm, double eps, at::Tensor gate_up, at::Tensor down) {
    TORCH_CHECK(attention.size() == ffn.size() + 1, "DecodePlan: add a layer's attention first");
    ffn.push_back({false, post_norm, eps, at::Tensor(), 0, 1, 1, false, 1.0, gate_up, down, 0,
                   std::nullopt, std::nullopt});
  }

  int64_t layers() const { return int64_t(ffn.size()); }

  // x [B, D] decode rows -> the residual stream after every layer (the step's latents
  // written into each layer's cache on the way)
  at::Tensor run(at::Tensor x, at::Tensor slots, at::Tensor tables, at::Tensor lens,
                 at::Tensor rot) const {
    TORCH_CHECK(attention.size() == ffn.size(), "DecodePlan: the last layer has no MLP");
    for (size_t i = 0; i < ffn.size(); ++i) {
      const MlaArgs& a = attention[i];
      x = mla_decode(x, a.in_norm, a.eps, a.qkv_a, a.q_a_norm, a.q_b, a.kv_a_norm, a.lora_eps,
                     a.w_uk_t, a.kv_b, a.o_proj, a.cache, slots, tables, lens, rot, a.heads,
                     a.nope, a.rope, a.vdim, a.scale);
      const FfnArgs& f = ffn[i];
      x = f.moe ? moe_decode(x, f.norm, f.eps, f.gate_w, f.top_k, f.n_group, f.topk_group,
                             f.norm_topk_prob, f.scaling, f.gate_up, f.down, f.start,
                             f.shared_gate_up, f.shared_down)
                : mlp_decode(x, f.norm, f.eps, f.gate_up, f.down);
    }
    return x;
  }
};

}  // namespace dsv2

TORCH_LIBRARY_FRAGMENT(dsv2_cpu, m) {
  m.class_<dsv2::DecodePlan>("DecodePlan")
      .def(torch::init<>())
      .def("add_mla", &dsv2::DecodePlan::add_mla)
      .def("add_moe", &dsv2::DecodePlan::add_moe)
      .def("add_mlp", &dsv2::DecodePlan::add_mlp)
      .def("layers", &dsv2::DecodePlan::layers)
      .def("run", &dsv2::DecodePlan::run);
}
