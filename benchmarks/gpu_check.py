"""GPU check: the engine on one CUDA device against transformers on the same device.

A random checkpoint of DeepSeek-V2-Lite's shape (its published config with fewer layers) in
bfloat16; then, in one run:
- exactness: the engine's greedy tokens teacher-forced through transformers on the same GPU;
  every token the engine picked must be the argmax of transformers' float32 logits (same
  weights) or fall short of that best logit by no more than twice transformers' own bf16
  rounding, measured at the same positions (random weights are full of near-ties). In float32
  the allowance is 1e-3. Checked with CUDA graphs on and off;
- speed: generated tokens/s at 1, 32 and 128 concurrent streams, transformers ``generate``
  (one padded batch) against the engine with CUDA graphs on and off;
- memory: the latent cache's bytes (per token, and what a per-head K/V cache would need).
Prints every figure and PASS/FAIL; exit status 0 only when every check passed. Runs in a few
minutes on one H200 (defaults: 4 layers, 64 new tokens).

Without CUDA it stops at once with a clear message (exit status 2). ``--device cpu --tiny``
runs the same steps on a tiny config on the CPU (the captured step then runs its static
buffers eagerly), so every part of this script is tested without a GPU.

    python benchmarks/gpu_check.py [--layers 4] [--streams 1,32,128] [--new-tokens 64]
    python benchmarks/gpu_check.py --device cpu --tiny      # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

# DeepSeek-V2-Lite's published config.json (kept with the model tests)
V2_LITE = ROOT / "tests" / "model" / "reference_configs" / "deepseek-v2-lite.config.json"
# --tiny: the same architecture at toy size (CPU smoke runs)
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
)
EXIT_NO_DEVICE = 2


def checkpoint_config(layers: int, tiny: bool) -> dict:
    """V2-Lite's config (first layer dense, the rest MoE) with ``layers`` layers."""
    cfg = json.loads(V2_LITE.read_text(encoding="utf-8"))
    for key in ("architectures", "model_type", "torch_dtype", "use_cache", "pretraining_tp"):
        cfg.pop(key, None)
    cfg["num_hidden_layers"] = layers
    cfg["max_position_embeddings"] = 4096  # the runs here are short; keeps tables small
    cfg["rope_scaling"] = None  # plain RoPE: YaRN's exactness is the model tests' job
    if tiny:
        cfg.update(TINY)
    return cfg


def resolve_device(name: str) -> torch.device:
    """The device to check on; exits with a clear message when it is not there."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: --device {name} but no CUDA device is visible to torch "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). "
            "Run it on a machine with a GPU, or use --device cpu --tiny for a smoke run.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_NO_DEVICE)
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            print(
                f"gpu_check: --device {name} but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_NO_DEVICE)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_checkpoint(path: Path, cfg: dict, dtype: torch.dtype, device: torch.device):
    """Random weights initialised on ``device`` (fast on a GPU), saved as a published-layout
    checkpoint in ``dtype``. Returns transformers' model in ``dtype`` (the speed peer) and the
    same weights in float32 (the exactness oracle; the same object when ``dtype`` is float32)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        hf = DeepseekV2ForCausalLM(DeepseekV2Config(**cfg)).to(dtype).eval()
    hf.save_pretrained(path)
    if dtype == torch.float32:
        return hf, hf
    # the saved (rounded) weights, computed in float32: what both bf16 models approximate
    with torch.device(device):
        oracle = DeepseekV2ForCausalLM(DeepseekV2Config(**cfg)).eval()
    oracle.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
    return hf, oracle


def prompts_for(count: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab, (count, length), generator=g).tolist()


def hf_tokens_per_second(hf, prompts: list[list[int]], new_tokens: int, device) -> float:
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    sync(device)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def engine_run(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    from services.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    sync(engine.device)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(engine.device)
    return len(prompts) * new_tokens / (time.perf_counter() - start), [o.token_ids for o in outs]


def teacher_forced(
    hf, oracle, prompts: list[list[int]], outputs: list[list[int]], device
) -> tuple[float, float, float]:
    """Teacher-force prompt + the engine's tokens through the float32 oracle and through
    transformers in the run's dtype. Returns (worst gap: the largest amount by which a picked
    token's oracle logit falls short of the oracle's best logit at its position, 0 when every
    pick is the argmax; transformers' own rounding: the largest |logit - oracle logit| at those
    positions; the share of picks that are the oracle's argmax)."""
    worst = noise = 0.0
    argmax_hits = total = 0
    p = len(prompts[0])
    for i in range(0, len(prompts), 16):
        ids = torch.tensor(
            [a + b for a, b in zip(prompts[i : i + 16], outputs[i : i + 16], strict=True)],
            device=device,
        )
        with torch.inference_mode():
            truth = oracle(ids).logits[:, p - 1 : -1].float()  # [B, N, V]
            if hf is not oracle:
                rounded = hf(ids).logits[:, p - 1 : -1].float()  # [B, N, V]
                noise = max(noise, float((rounded - truth).abs().max()))
        picked = truth.gather(-1, ids[:, p:, None])[..., 0]  # [B, N]
        best = truth.max(-1)
        worst = max(worst, float((best.values - picked).max()))
        argmax_hits += int((best.indices == ids[:, p:]).sum())
        total += picked.numel()
    return worst, noise, argmax_hits / max(total, 1)


def build_engine(path: Path, dtype: torch.dtype, device: torch.device, max_streams: int):
    """The engine on ``device``; on the CPU its captured step runs eagerly (the smoke run
    still goes through the static buffers and padding)."""
    import model as dsv2
    from services.engine import Engine, EngineOptions
    from services.engine.graphs import CapturedDecode

    m = dsv2.load_pretrained(path, dtype=dtype).to(device)
    options = EngineOptions(
        max_num_seqs=max_streams,
        max_model_len=1024,
        max_num_batched_tokens=max(2048, 64 * max_streams),
        enable_prefix_caching=False,
        cuda_graphs=True,
    )
    engine = Engine(m, None, options)
    if engine.runner.captured is None and device.type == "cpu":
        engine.runner.captured = CapturedDecode(engine.runner, max_streams, engine.max_model_len)
    return engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --tiny)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (V2-Lite has 27)")
    ap.add_argument("--streams", default=None, help="comma-separated (default 1,32,128)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (8 with --tiny)")
    ap.add_argument("--tolerance", type=float, default=None, help="largest logit gap allowed")
    ap.add_argument("--tiny", action="store_true", help="toy-sized model (CPU smoke run)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    streams = [int(s) for s in (args.streams or ("1,4" if args.tiny else "1,32,128")).split(",")]
    new_tokens = args.new_tokens or (8 if args.tiny else 64)
    # float32: two correct implementations agree to ~1e-5; the bf16 allowance is measured
    floor = 1e-3
    cfg = checkpoint_config(args.layers, args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), {dtype}, torch {torch.__version__}", flush=True)

    verdicts: list[bool] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        hf, oracle = write_checkpoint(path, cfg, dtype, device)
        n_params = sum(p.numel() for p in hf.parameters())
        print(
            f"checkpoint: V2-Lite shape{' (tiny)' if args.tiny else ''}, {args.layers} layers, "
            f"{n_params / 1e6:.1f}M parameters, written in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        engine = build_engine(path, dtype, device, max(streams))
    runner = engine.runner
    captured = runner.captured
    prompts = prompts_for(max(streams), args.prompt_tokens, cfg["vocab_size"])

    # warm up: first calls pick kernels; every graph shape the timed runs use is captured
    hf_tokens_per_second(hf, prompts[:2], 4, device)
    t = time.perf_counter()
    for s in streams:
        engine_run(engine, prompts[:s], new_tokens)
    print(
        f"warm-up (graph capture included): {time.perf_counter() - t:.1f} s, "
        f"{captured.num_captured if captured else 0} captured step shapes",
        flush=True,
    )

    # exactness, graphs on and off, at the largest stream count
    check = prompts[: max(streams)]
    for label, graphs in (("graphs on", captured), ("graphs off", None)):
        runner.captured = graphs
        _, outs = engine_run(engine, check, new_tokens)
        gap, noise, hits = teacher_forced(hf, oracle, check, outs, device)
        # a correct low-precision pick can lose to the true best by its own rounding plus the
        # best's: twice what transformers' rounding moves a logit at the same positions
        tolerance = args.tolerance or max(floor, 2 * noise)
        ok = gap <= tolerance and all(len(o) == new_tokens for o in outs)
        verdicts.append(ok)
        print(
            f"exactness ({label}): {len(check)} streams x {new_tokens} tokens, {hits:.1%} the "
            f"float32 oracle's argmax, every engine token within {gap:.1e} of its best logit "
            f"(allowed {tolerance:.1e}; transformers {dtype} itself moves logits by up to "
            f"{noise:.1e}): {'PASS' if ok else 'FAIL'}",
            flush=True,
        )

    for s in streams:
        batch = prompts[:s]
        hf_tps = hf_tokens_per_second(hf, batch, new_tokens, device)
        runner.captured = captured
        on_tps, _ = engine_run(engine, batch, new_tokens)
        runner.captured = None
        off_tps, _ = engine_run(engine, batch, new_tokens)
        print(
            f"{s:>4} streams: transformers {hf_tps:9.1f} tok/s | engine graphs on "
            f"{on_tps:9.1f} tok/s ({on_tps / hf_tps:5.2f}x) | graphs off {off_tps:9.1f} tok/s "
            f"({off_tps / hf_tps:5.2f}x)",
            flush=True,
        )
    runner.captured = captured

    c = engine.config
    per_token = runner.bytes_per_token(c, dtype)
    head_kv = c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    mha = head_kv * dtype.itemsize
    print(
        f"latent cache: {runner.cache_bytes / 2**20:.1f} MiB for {runner.num_blocks} blocks of "
        f"{runner.block_size} tokens; {per_token} bytes a token "
        f"({c.num_hidden_layers} layers x {c.kv_lora_rank + c.qk_rope_head_dim} values), "
        f"{mha / per_token:.1f}x less than per-head K/V ({mha} bytes a token)"
    )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    ok = all(verdicts)
    print(f"overall: {'PASS' if ok else 'FAIL'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
