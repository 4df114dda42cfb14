"""Memory per edit for a 7B-shaped target layer, computed and measured on CPU (issue 13).

    python benchmarks/bank_memory.py [--rank 4] [--out benchmarks/bank_memory.json]

For each LLaMA-7B MLP shape (4096 -> 11008, 11008 -> 4096) in bf16: the bytes of one block (one edit
batch) from the formula ``rank x (d_in + d_out) x 2``, then a real ``BlockBank`` on CPU filled past two
chunks: bytes its buffers hold (``nbytes`` of the live buffers) and the peak of live tensor bytes while
it grew (torch.profiler allocation events, ``_common.peak_tensor_bytes``), so the excess over the
blocks' own bytes is measured, not assumed. Also the database's bytes per stored key for 4096-d keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import MEASURED_PATHS, peak_tensor_bytes  # noqa: E402
from melo_fast import bank  # noqa: E402
from melo_fast.bank import BlockBank  # noqa: E402
from melo_fast.eval.report import git_state  # noqa: E402

SHAPES = [(4096, 11008), (11008, 4096)]
HIDDEN = 4096  # the router's width in a 7B model: the keys' width


def measure(d_in: int, d_out: int, rank: int) -> dict:
    block_bytes = rank * (d_in + d_out) * 2
    probe = BlockBank(rank, d_in, d_out, torch.bfloat16, torch.device("cpu"))
    count = 2 * probe.chunk_capacity + 100  # into a third chunk
    a, b = torch.randn(rank, d_in), torch.randn(rank, d_out)  # float32: converted on the way in, as in an edit
    held = {}

    def grow():
        filled = BlockBank(rank, d_in, d_out, torch.bfloat16, torch.device("cpu"))
        for _ in range(count):
            filled.append(a, b)
        held["bytes"] = sum(A.nbytes + B.nbytes for A, B in filled._buffers)
        held["blocks"] = filled.count

    peak = peak_tensor_bytes(grow)
    blocks_bytes = held["blocks"] * block_bytes
    return {
        "shape": f"{d_in}->{d_out}", "rank": rank, "dtype": "bfloat16",
        "block_bytes_computed": block_bytes,
        "blocks_stored": held["blocks"], "chunk_bytes": bank.CHUNK_BYTES, "blocks_per_chunk": probe.chunk_capacity,
        "bytes_held_by_buffers": held["bytes"], "blocks_own_bytes": blocks_bytes,
        "held_over_blocks_bytes": held["bytes"] - blocks_bytes,
        "peak_live_bytes_while_growing": peak, "peak_over_blocks_bytes": peak - blocks_bytes,
        "peak_excess_in_chunks": (peak - blocks_bytes) / bank.CHUNK_BYTES,
        "bytes_per_edit_batch": block_bytes,
        "bytes_per_edited_fact": {f"batch of {n}": block_bytes / n for n in (1, 10, 100)},
    }


def database_bytes_per_key(dim: int) -> dict:
    """A key stored as its own cluster: center and point (float32), radius, label, offset, block id,
    and the insert's cached squared norm and reach; the growable buffers keep up to 25% more rows."""
    row = dim * 4
    per_key = 2 * row + 4 + 8 + 8 + 8 + 4 + 4
    return {"dim": dim, "bytes_per_key": per_key, "bytes_per_key_with_buffer_room": per_key + 2 * row // 4}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=4, help="rank of one block (MeloConfig.rank_per_block, default 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "bank_memory.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"targets": [measure(d_in, d_out, args.rank) for d_in, d_out in SHAPES],
              "database": database_bytes_per_key(HIDDEN), "torch": torch.__version__,
              "source": git_state(ROOT, MEASURED_PATHS)}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
