"""A growing block bank never holds more than one chunk beyond its blocks' own size (issue 13).

Measured, not computed: torch.profiler records every allocation and free of the appends, and the
running sum of those events is the memory the bank holds at each moment, including the instant a
buffer grows (old and new both alive). The chunk is shrunk so that the test crosses several chunks.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from melo_fast import bank
from melo_fast.bank import BlockBank

RANK, D_IN, D_OUT = 4, 100, 150  # 4000-byte blocks in float32


def live_bytes_after_each_append(count: int) -> list[tuple[int, int]]:
    """``(blocks stored, peak bytes held during that append)`` for ``count`` appends to a new bank."""
    block = torch.ones(RANK, D_IN), torch.ones(RANK, D_OUT)
    bank_ = BlockBank(RANK, D_IN, D_OUT, torch.float32, torch.device("cpu"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        for _ in range(count):
            with torch.profiler.record_function("append"):
                bank_.append(*block)
    memory = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "append")
    live, peak_in, event = 0, [], 0
    for start, end in spans:
        while event < len(memory) and memory[event][0] < start:  # frees between appends
            live += memory[event][1]
            event += 1
        peak = live
        while event < len(memory) and memory[event][0] <= end:
            live += memory[event][1]
            peak = max(peak, live)
            event += 1
        peak_in.append(peak)
    return [(i + 1, peak) for i, peak in enumerate(peak_in)]


@pytest.mark.parametrize("chunk_blocks", [16, 40])
def test_growth_stays_within_one_chunk_of_the_blocks(monkeypatch, chunk_blocks):
    block_bytes = RANK * (D_IN + D_OUT) * 4
    monkeypatch.setattr(bank, "CHUNK_BYTES", chunk_blocks * block_bytes)
    marks = live_bytes_after_each_append(6 * chunk_blocks + 3)  # six chunks and a bit
    excess = [(stored, peak - stored * block_bytes) for stored, peak in marks]
    worst = max(excess, key=lambda item: item[1])
    assert worst[1] <= bank.CHUNK_BYTES + 2 * block_bytes, worst  # + the block being converted on its way in
    # and it did grow: the bank holds all the blocks
    assert marks[-1][1] >= marks[-1][0] * block_bytes
