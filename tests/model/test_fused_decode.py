"""model.fused_decode: a decode-only CPU step run as two C++ calls a layer gives the eager
step's logits and writes the same latents into the cache, on every vector path this CPU can
run, with MLA's q_lora_rank or without it, dense and MoE layers, group-limited routing,
contexts that end mid-block and rows of different lengths; steps it does not cover (prefill
chunks, too many rows) run eagerly."""

from __future__ import annotations

import pytest
import torch

import model
from model import cpu_ext, fused_decode
from model.kernels import use_ext_isa
from tests.support.checkpoints import write_random_checkpoint
from tests.support.paged_steps import paged_step

OPS = cpu_ext.load()
BS = 4  # block size: contexts below span several blocks and end inside one


@pytest.fixture(params=list(cpu_ext.ISA))
def path(request):
    """Each C++ path in turn; paths this CPU lacks skip with the reason."""
    if OPS is None:
        pytest.skip(f"C++ kernels not built: {cpu_ext.why_unavailable()}")
    if cpu_ext.ISA[request.param] > int(OPS.cpu_max_isa()):
        pytest.skip(f"this CPU has no {request.param}")
    assert use_ext_isa(request.param) == request.param
    yield request.param
    use_ext_isa(None)


def _prefill(m, prompts, tables):
    """Each prompt's latents into its blocks through one eager prefill step."""
    _, step = paged_step(tables, [(i, 0, len(p)) for i, p in enumerate(prompts)], BS)
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    with torch.inference_mode():
        m(torch.tensor([t for p in prompts for t in p]), positions, step)


def _decode_step(tokens, lens, tables, dtype=torch.float32):
    """One decode row per sequence: its next token at position lens[i] - 1."""
    rows = [(i, n - 1, n) for i, n in enumerate(lens)]
    positions, step = paged_step(tables, rows, BS, dtype)
    return torch.tensor(tokens), positions, step


def _model(tmp_path, dtype, blocks=64, **overrides):
    path = write_random_checkpoint(tmp_path, seed=3, **overrides)
    m = model.load_pretrained(path, dtype=dtype)
    m.pack_for_inference()
    cfg = m.config
    cache = torch.zeros(cfg.num_hidden_layers, blocks, BS, cfg.latent_cache_dim, dtype=dtype)
    m.bind_kv_cache(cache)
    return m, cache


def _both_ways(m, cache, ids, positions, step):
    """(logits, cache) of the step fused and eager, from the same cache contents."""
    before = cache.clone()
    results = []
    for fused in (True, False):
        cache.copy_(before)
        m.set_fused_decode(fused)
        with torch.inference_mode():
            logits = m(ids, positions, step)
        results.append((logits.float(), cache.clone()))
    m.set_fused_decode(True)
    return results


def _scale_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("rows", [6, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "overrides",
    [{}, {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1}],
    ids=["q_lora+grouped", "no_q_lora+greedy"],
)
def test_fused_step_equals_the_eager_step(tmp_path, path, dtype, overrides, rows):
    m, cache = _model(tmp_path, dtype, blocks=6 * rows, **overrides)
    g = torch.Generator().manual_seed(rows)
    # rows of different context lengths: some end on a block boundary, the others inside one
    lens = torch.randint(2, 6 * BS, (rows,), generator=g).tolist()
    lens[0] = 3 * BS
    tables = [list(range(i * 6, i * 6 + 6)) for i in range(rows)]
    tables[1].reverse()  # blocks out of order
    prompts = [torch.randint(0, 512, (n - 1,), generator=g).tolist() for n in lens]
    _prefill(m, prompts, tables)
    next_tokens = torch.randint(0, 512, (rows,), generator=g).tolist()
    ids, positions, step = _decode_step(next_tokens, lens, tables, dtype)
    with torch.inference_mode():
        assert fused_decode.step_qualifies(m.model.embed_tokens(ids), step)
    (fused, cache_f), (eager, cache_e) = _both_ways(m, cache, ids, positions, step)
    # float32: the same products summed in another order; bfloat16: the same roundings, so
    # at most a value that lands on the other side of a rounding boundary (measured: equal)
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    assert _scale_err(fused, eager) <= limit
    assert _scale_err(cache_f.float(), cache_e.float()) <= limit
    if dtype == torch.float32:
        assert torch.equal(fused.argmax(-1), eager.argmax(-1))


def test_steps_it_does_not_cover_run_eagerly(tmp_path):
    if OPS is None:
        pytest.skip(f"C++ kernels not built: {cpu_ext.why_unavailable()}")
    m, _ = _model(tmp_path, torch.float32)
    most = fused_decode.FUSED_MAX_ROWS[torch.float32]
    x = torch.zeros(most + 1, m.config.hidden_size)
    tables = [[i] for i in range(most + 1)]
    _, _, step = _decode_step([1] * (most + 1), [1] * (most + 1), tables)
    assert not fused_decode.step_qualifies(x, step)  # one row more than it takes
    _, _, step = _decode_step([1] * 4, [1] * 4, tables[:4])
    assert fused_decode.step_qualifies(x[:4], step)
    step.decode_lens = None  # a caller that gives no context lengths
    assert not fused_decode.step_qualifies(x[:4], step)
    with torch.enable_grad():
        _, _, step = _decode_step([1] * 4, [1] * 4, tables[:4])
        assert not fused_decode.step_qualifies(x[:4].requires_grad_(), step)


def test_all_layers_run_as_one_call_and_as_the_layer_by_layer_calls(tmp_path, path):
    """A step every layer of which is covered runs as one DecodePlan call; it gives what the
    per-layer calls give (the same C++ code, so bit for bit), and a model with one layer
    left eager runs the others layer by layer."""
    m, cache = _model(tmp_path, torch.bfloat16, blocks=24)
    rows, lens = 4, [5, 9, 12, 3]
    tables = [list(range(i * 6, i * 6 + 6)) for i in range(rows)]
    g = torch.Generator().manual_seed(7)
    _prefill(m, [torch.randint(0, 512, (n - 1,), generator=g).tolist() for n in lens], tables)
    ids, positions, step = _decode_step([5, 6, 7, 8], lens, tables, torch.bfloat16)
    with torch.inference_mode():  # weights are bound outside autograd only
        plan = m.model.fused_plan()
    assert plan is not None and plan.layers() == m.config.num_hidden_layers
    before = cache.clone()
    with torch.inference_mode():
        one_call = m(ids, positions, step)
    cache_one = cache.clone()

    cache.copy_(before)
    m.model._plan = (m.model._plan[0], None)  # as if not every layer were covered
    with torch.inference_mode():
        by_layer = m(ids, positions, step)
    assert torch.equal(one_call, by_layer) and torch.equal(cache, cache_one)

    m.model.forget_fused_plan()
    m.model.layers[1].use_fused_decode = False  # that layer eager, the others per layer
    with torch.inference_mode():
        assert m.model.fused_plan() is None
    cache.copy_(before)
    with torch.inference_mode():
        mixed = m(ids, positions, step)
    m.set_fused_decode(False)
    cache.copy_(before)
    with torch.inference_mode():
        eager = m(ids, positions, step)
    assert _scale_err(mixed.float(), eager.float()) <= 1e-2
    assert _scale_err(one_call.float(), eager.float()) <= 1e-2
