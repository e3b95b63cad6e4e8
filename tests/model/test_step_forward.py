"""The model's one forward over the paged latent cache (``model(ids, positions, step)``).

Two sequences share one step the way the engine packs them (decode rows first, then prefill
chunks), their blocks scattered over the cache; every step's logits must equal the plain
reference decode (model.decode: one contiguous cache per sequence, absorbed attention op by
op), and ``inputs_embeds`` must give what ``input_ids`` gives. The decode-only steps run the
fused CPU decode where the C++ kernels are built (model.fused_decode).
"""

from __future__ import annotations

import pytest
import torch

import model
from model.decode import LatentCache, decode_step
from tests.support.checkpoints import write_random_checkpoint
from tests.support.paged_steps import paged_step

BS = 4  # block size


@pytest.mark.parametrize("embeds", [False, True])
def test_packed_steps_over_scattered_blocks_equal_the_reference(tmp_path, embeds):
    path = write_random_checkpoint(tmp_path, seed=4)
    m = model.load_pretrained(path)
    ref = model.load_pretrained(path)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 512, (26,), generator=g), torch.randint(0, 512, (11,), generator=g)]
    num_blocks = 16
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = [order[:7], order[7:10]]  # each sequence's blocks, scattered
    cfg = m.config
    m.pack_for_inference()
    m.bind_kv_cache(torch.zeros(cfg.num_hidden_layers, num_blocks, BS, cfg.latent_cache_dim))
    caches = [LatentCache(ref, 26), LatentCache(ref, 11)]

    # (seq, start, end): chunked prefill of both, then a decode row mixed with a chunk,
    # then decode rows only
    schedule = [
        [(0, 0, 12), (1, 0, 7)],
        [(1, 7, 8), (0, 12, 20)],
        [(1, 8, 9), (0, 20, 21)],
        [(0, 21, 22), (1, 9, 10)],
    ]
    for rows in schedule:
        positions, step = paged_step(tables, rows, BS)
        ids = torch.cat([seqs[s][a:b] for s, a, b in rows])
        with torch.inference_mode():
            if embeds:
                got = m(positions=positions, step=step, inputs_embeds=m.model.embed_tokens(ids))
            else:
                got = m(ids, positions, step)
            want = torch.cat([decode_step(ref, caches[s], seqs[s][a:b]) for s, a, b in rows])
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-4


def test_inputs_embeds_equal_input_ids_in_the_causal_pass(tiny_checkpoint):
    m = model.load_pretrained(tiny_checkpoint)
    ids = torch.randint(0, m.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m(inputs_embeds=m.model.embed_tokens(ids)), m(ids))
    with pytest.raises(ValueError, match="exactly one"):
        m(ids, inputs_embeds=m.model.embed_tokens(ids))
