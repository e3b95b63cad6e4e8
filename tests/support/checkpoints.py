"""Tiny random DeepSeek-V2 checkpoints written by transformers (the oracle), plus a small
byte-level BPE tokenizer with the DeepSeek-V2-Chat chat template, for tests anywhere.

``write_random_checkpoint(path, seed=0, dtype=torch.float32, sharded=False, **overrides)``
writes config.json (in the published layout: rope_theta + legacy rope_scaling), safetensors
via ``transformers.DeepseekV2ForCausalLM.save_pretrained`` (per-expert tensor names as
published), tokenizer.json and tokenizer_config.json. Overrides use config.json field names.
Configs transformers cannot represent (moe_layer_freq > 1, norm_topk_prob) are written by
this project's own model instead.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from model.config import DeepseekV2Config
from model.tokenizer import DEEPSEEK_V2_CHAT_TEMPLATE

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
TOKENIZER_VOCAB = 512

# Small, but with every feature the real configs use: MLA with q_lora_rank, YaRN, a dense
# first layer, shared experts and group-limited routing over 8 experts in 4 groups.
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": TOKENIZER_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_shared_experts": 1,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "routed_scaling_factor": 1.0,
    "topk_method": "group_limited_greedy",
    "n_group": 4,
    "topk_group": 2,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.1,  # larger than 0.02 so logits are far from uniform
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 512,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "attention_bias": False,
    "attention_dropout": 0.0,
}

_ONLY_OURS = ("moe_layer_freq", "scoring_func", "aux_loss_alpha", "seq_aux", "rope_scaling")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "DeepSeek-V2 is a mixture-of-experts language model with multi-head latent attention.",
    "User: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 -7 1e-6",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "深度求索发布了一个混合专家语言模型，它使用多头潜在注意力机制。",
    "中文文本必须正确地流式输出，不能出现半个字符。北京是中国的首都。",
    "Streaming text token by token must never split a character: café, naïve, 日本語, 🙂.",
    "Once upon a time there was a small model that learned to count and to say hello.",
    "The engine batches requests, caches prefixes, and streams tokens back to the user.",
    "Experts are sharded across machines; each token visits only a few of them.",
]


def build_tokenizer() -> Any:
    """A deterministic byte-level BPE ``tokenizers.Tokenizer`` with exactly TOKENIZER_VOCAB
    tokens: bos, eos, all 256 bytes, then merges learned from a small mixed corpus."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_tokenizer_json())


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def write_tokenizer(path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(_tokenizer_json(), encoding="utf-8")
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 16384,
        "chat_template": DEEPSEEK_V2_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _perturb_norms(module: torch.nn.Module, seed: int) -> None:
    # Norm weights start at 1; make them random too so a misplaced norm shows in the logits.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def write_random_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    sharded: bool = False,
    **config_overrides: Any,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    values = {**TINY_CONFIG, **config_overrides}
    config = DeepseekV2Config.from_dict(values)  # fails early on an unsupported config
    hf_ok = config.moe_layer_freq == 1 and not config.norm_topk_prob
    if hf_ok:
        from transformers import DeepseekV2Config as HFConfig
        from transformers import DeepseekV2ForCausalLM as HFModel

        hf_values = {k: v for k, v in config.to_dict().items() if k not in _ONLY_OURS}
        hf_values.pop("torch_dtype", None)
        hf_values.pop("architectures", None)
        hf_values.pop("model_type", None)
        if config.rope_scaling:
            hf_values["rope_scaling"] = dict(config.rope_scaling)
        torch.manual_seed(seed)
        hf = HFModel(HFConfig(**hf_values))
        _perturb_norms(hf, seed)
        hf.to(dtype).save_pretrained(path, max_shard_size="64KB" if sharded else "50GB")
    else:
        from model.loading import save_pretrained
        from model.transformer import DeepseekV2ForCausalLM

        torch.manual_seed(seed)
        ours = DeepseekV2ForCausalLM(config)
        _perturb_norms(ours, seed)
        save_pretrained(ours, path, dtype=dtype, max_shard_bytes=64 << 10 if sharded else None)
    # config.json in the published layout (rope_theta + legacy rope_scaling).
    published = config.to_dict()
    published["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(published, indent=2) + "\n", encoding="utf-8")
    write_tokenizer(path)
    return path
