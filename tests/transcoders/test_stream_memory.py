"""Streaming training holds a bounded buffer: its memory does not grow with the number of cells."""

from __future__ import annotations

import tracemalloc

from cellcircuits.transcoders import ActivationStream, train_on_stream

from .streaming import CONFIG, TRAIN, make_prompts


def test_buffer_memory_stays_flat_when_cells_grow_tenfold(tiny_c2s):
    """Peak buffer rows, buffer bytes and traced allocations while training do not grow with the number of cells."""
    measured = {}
    big = make_prompts(tiny_c2s, 200)
    # the same training for both: enough tokens to pass over all 200 cells once
    n_tokens = int(ActivationStream(tiny_c2s, big, buffer_rows=1024).rows_per_cell.sum()) + 1024
    for n_cells in (20, 200):
        stream = ActivationStream(tiny_c2s, big[:n_cells], buffer_rows=1024, cells_per_pass=40)
        tracemalloc.start()
        train_on_stream(stream, CONFIG, n_tokens=n_tokens, **{**TRAIN, "batch_size": 512})
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        measured[n_cells] = (stream.peak_rows, stream.nbytes, peak, stream.epoch)
    (rows20, bytes20, peak20, _), (rows200, bytes200, peak200, epochs200) = measured[20], measured[200]
    assert epochs200 >= 1  # every one of the 200 cells went through the buffer
    assert 512 < rows20 <= 1024 and 512 < rows200 <= 1024
    assert bytes20 == bytes200 == 2 * 2 * 1024 * 32 * 2  # layers x (in, out) x rows x d_model x float16
    # Python-side allocations: at most 25% more (the 20-cell run already passed over its cells 10 times as often)
    assert peak200 < 1.25 * peak20, (peak20, peak200)
    print(f"peak rows {rows20} vs {rows200}, buffer bytes {bytes20} vs {bytes200}, traced peak {peak20} vs {peak200}")
