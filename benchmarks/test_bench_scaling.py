"""Scaling curves: lookup time vs number of stored keys, and patched forward time vs number of edits.

    pytest -q benchmarks/test_bench_scaling.py --benchmark-only

1. Lookup (``ops.vecdb_search``), d = 768, C = 1k ... 1M stored keys (singleton clusters, the point at
   the center; half the queries hit), Q = 1 and Q = 32 queries, every backend of the device. The
   ``reference`` backend (plain Python loops, ~15 us per query-center pair on a small CPU) runs only
   while Q x C <= 320k (one call of a few seconds) and is skipped above.
   Groups: one per (Q, C); the baseline is ``reference`` where it ran, else ``torch``.
   Plot ``lookup_vs_keys``: time vs C, log-log, one line per backend and Q.
2. Forward vs edits: BERT-base-shaped model (768-d keys), B x T = 4 x 64, patched with 0 ... 1M
   edits (database and banks written directly, the batch's keys among them, one block per 10 edits,
   at most 1000 blocks) for each non-reference backend, vs the unpatched model. On CPU the torch
   backend stops at 100k edits (one forward with 1M keys takes ~15 s: it materializes C x d
   temporaries); the lookup curve has torch at 1M keys.
   Plot ``forward_vs_edits``.
"""

from __future__ import annotations

import pytest
import torch

import melo_fast
from melo_fast import MeloConfig, ops

try:
    from benchmarks._common import (
        DEVICE,
        available_backends,
        bench,
        default_backend,
        fill_edits,
        lookup_database,
        lookup_queries,
        peak_rss,
    )
except ImportError:  # benchmarks/ run as a rootdir-less folder
    from _common import (
        DEVICE,
        available_backends,
        bench,
        default_backend,
        fill_edits,
        lookup_database,
        lookup_queries,
        peak_rss,
    )

DIM = 768
KEYS = [1_000, 3_000, 10_000, 30_000, 100_000, 1_000_000]
QUERIES = [1, 32]
REFERENCE_MAX_PAIRS = 32 * 10_000
BACKENDS = [b for b in ("reference", "torch", "cpp", "triton") if b in available_backends()]

FWD_EDITS = [None, 0, 1_000, 10_000, 100_000, 1_000_000]
FWD_BATCH, FWD_SEQ = 4, 64
EDITS_PER_BLOCK, MAX_BLOCKS = 10, 1000
TORCH_MAX_EDITS = 100_000 if DEVICE == "cpu" else 10**9


def lookup_cases():
    for c in KEYS:
        for q in QUERIES:
            for backend in BACKENDS:
                yield pytest.param(c, q, backend, id=f"C{c}-Q{q}-{backend}")


class One:
    """Holds one value of a key at a time (so a 1M-key database is built once, and freed before the next)."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, make):
        if self.key != key:
            self.value = None
            self.value = make()
            self.key = key
        return self.value


@pytest.fixture(scope="module")
def lookup_data():
    cache = One()
    yield cache
    cache.value = None


@pytest.mark.parametrize(("n_keys", "n_queries", "backend"), list(lookup_cases()))
def test_lookup_scaling(benchmark, lookup_data, n_keys, n_queries, backend):
    database = lookup_data.get(n_keys, lambda: lookup_database(n_keys, DIM))
    queries = lookup_queries(database[0], n_queries)
    reference_runs = n_queries * n_keys <= REFERENCE_MAX_PAIRS
    if backend == "reference" and not reference_runs:
        pytest.skip(f"reference: Q x C = {n_queries * n_keys:,} pairs would take more than a few seconds per call")
    # The reference, and the torch backend at 1M keys on CPU (~10 s a call), run without the warm-up call
    # that picks the number of rounds: one round (their code paths are warm from the smaller sizes).
    slow = backend == "reference" or (backend == "torch" and DEVICE == "cpu" and n_keys >= 1_000_000)
    centers = database[0]
    bench(benchmark, lambda: ops.vecdb_search(queries, *database, backend=backend),
          group=f"lookup scaling {DEVICE} Q={n_queries} d={DIM} C={n_keys:,}", case=backend,
          baseline="reference" if reference_runs else "torch", target_s=0.5, min_rounds=1 if slow else 3,
          warmup=0 if slow else 1, plot="lookup_vs_keys", x=n_keys, series=f"{backend}, Q={n_queries}",
          op="vecdb_search", backend=backend, dtype=queries.dtype, Q=n_queries, d=DIM, C=n_keys,
          points_per_cluster=1, shapes={"queries": [n_queries, DIM], "centers": [n_keys, DIM]},
          database_bytes=centers.numel() * centers.element_size() + 3 * 8 * n_keys)
    benchmark.extra_info["process_peak_rss_bytes"] = peak_rss()


# ---- forward vs edits ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).to(DEVICE).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size - 100, (FWD_BATCH, FWD_SEQ), generator=g)
    batch = {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE)}
    yield model, batch, One()


def forward_cases():
    for edits in FWD_EDITS:
        backends = [b for b in BACKENDS if b != "reference"] if edits is not None else ["none"]
        if edits == 0:
            backends = [default_backend()]  # no lookup and no LoRA at 0 edits: the backend does not matter
        for backend in backends:
            if backend == "torch" and edits is not None and edits > TORCH_MAX_EDITS:
                continue  # ~14 s per forward on 2 CPU cores; the lookup curve shows torch at 1M keys
            yield pytest.param(edits, backend, id="unpatched" if edits is None else f"edits{edits}-{backend}")


@pytest.mark.parametrize(("edits", "backend"), list(forward_cases()))
def test_forward_vs_edits(benchmark, bert, edits, backend):
    model, batch, databases = bert
    editor = None
    if edits is not None:
        editor = melo_fast.patch(model, MeloConfig(backend=backend))
        blocks = min(MAX_BLOCKS, max(FWD_BATCH, edits // EDITS_PER_BLOCK))
        if edits:
            state = databases.get(edits, lambda: fill_edits(editor, edits, blocks, hits=editor.keys(batch)))
            editor.replace_state(*state)
            assert editor.route(batch).tolist() == list(range(FWD_BATCH))

    def forward():
        with torch.no_grad():
            return model(**batch)

    def unedited():
        with editor.disabled():
            return forward()

    try:
        bench(benchmark, forward, group=f"forward vs edits bert-base {DEVICE} B={FWD_BATCH} T={FWD_SEQ} fp32",
              case="unpatched" if edits is None else f"{backend}, {edits:,} edits", baseline="unpatched",
              target_s=1.5, paired=None if editor is None else ("unpatched, interleaved", unedited),
              plot="forward_vs_edits", x=edits, series=backend, edits=edits, backend=backend,
              default_backend=backend == default_backend(), dtype=torch.float32, tokens=FWD_BATCH * FWD_SEQ,
              shapes={"input_ids": [FWD_BATCH, FWD_SEQ], "keys": [edits or 0, DIM]},
              blocks=editor.num_blocks if editor is not None else 0)
    finally:
        if editor is not None:
            melo_fast.unpatch(model)
