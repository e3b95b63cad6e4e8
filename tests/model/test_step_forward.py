"""The model's one forward over the paged latent cache (``model(ids, positions, step)``).

Two sequences share one step the way the engine packs them (decode rows first, then prefill
chunks), their blocks scattered over the cache; every step's logits must equal the plain
reference decode (model.decode: one contiguous cache per sequence, absorbed attention op by
op), and ``inputs_embeds`` must give what ``input_ids`` gives.
"""

from __future__ import annotations

import pytest
import torch

import model
from model.decode import LatentCache, decode_step
from model.step import PrefillChunk, StepMetadata
from tests.support.checkpoints import write_random_checkpoint

BS = 4  # block size


def _step(tables, rows, num_blocks):
    """rows: (seq, start, end) per part, decode parts (end = start + 1) first -> the step's
    (positions, metadata) for the packed rows, every row sampled."""
    positions, slots, chunks = [], [], []
    decodes = [(s, a, b) for s, a, b in rows if b - a == 1]
    for s, a, b in rows:
        for p in range(a, b):
            positions.append(p)
            slots.append(tables[s][p // BS] * BS + p % BS)
    lens = [b for _, _, b in decodes]
    nb = -(-max(lens) // BS) if decodes else 0
    row = len(decodes)
    for s, a, b in rows[len(decodes) :]:
        chunks.append(PrefillChunk(row, b - a, b, torch.tensor(tables[s][: -(-b // BS)])))
        row += b - a
    step = StepMetadata(
        slot_mapping=torch.tensor(slots),
        max_position=max(positions),
        num_decodes=len(decodes),
        block_tables=torch.tensor(
            [tables[s][:nb] + [0] * (nb - len(tables[s][:nb])) for s, _, _ in decodes]
        )
        if decodes
        else None,
        decode_bias=None,
        prefills=chunks,
    )
    if decodes:
        keys = torch.arange(nb * BS)
        past = keys[None, :] >= torch.tensor(lens)[:, None]
        step.decode_bias = torch.zeros(len(lens), 1, nb * BS).masked_fill_(
            past[:, None], float("-inf")
        )
    return torch.tensor(positions), step


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
        positions, step = _step(tables, rows, num_blocks)
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
