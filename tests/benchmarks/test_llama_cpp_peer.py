"""llama_cpp_peer reads llama-batched-bench's table the way engine_vs_hf counts tokens/s: new
tokens over the whole run, prompt processing included (no llama.cpp build is needed here)."""

from __future__ import annotations

import pytest

from benchmarks.llama_cpp_peer import parse_batched_bench

# the table layout llama-batched-bench prints (values from a run on this machine)
TABLE = """
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, n_threads = 1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |    128 |    1 |    160 |    0.067 |   480.79 |    1.602 |    79.89 |    1.669 |    95.88 |
|    32 |    128 |   32 |   5120 |    1.617 |   633.11 |   13.837 |   296.02 |   15.454 |   331.30 |

llama_perf_context_print:        load time =      35.24 ms
"""


def test_new_tokens_over_whole_run_per_batch_size():
    speeds = parse_batched_bench(TABLE)
    assert set(speeds) == {1, 32}
    assert speeds[1] == pytest.approx(128 / 1.669)
    assert speeds[32] == pytest.approx(32 * 128 / 15.454)  # not S_TG: prefill counts too


def test_output_without_results_is_an_error():
    with pytest.raises(RuntimeError, match="no results"):
        parse_batched_bench("error: unable to load model\n")
