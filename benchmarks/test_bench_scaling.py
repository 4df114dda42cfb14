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
3. The database at scale (issue 13), d = 768, C = 1k ... 1M stored keys (1M when the machine has the
   memory): ``VectorDatabase.insert`` of a batch of 100 keys, in the steady state of an editor (each
   insert goes into a copy of the last database, as a commit does), every round a fresh batch:
   ``new`` = 100 new facts (all new clusters), ``mixed`` = 25 merges, 25 conflicts and 50 new (up to
   100k). Each round of an insert is preceded by ``vecdb_search`` of the same 100 keys against the same
   database (default backend), timed alone: the pairs give the interleaved insert/search ratio.
   Then save and load of a BERT-base editor (768-d keys, 2 targets 3072->768, rank 4) holding C
   keys and one block per 10 keys (at most 1000): ``editor.save`` (safetensors + JSON, fsynced) next to
   ``torch.save`` of the same tensors plus an fsync, and ``editor.reload`` next to ``torch.load``
   (interleaved). Plot ``db_scaling`` (``benchmarks/plot_db_scaling.py``).
"""

from __future__ import annotations

import os
import random

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
        sync,
        synthetic_blocks,
        synthetic_database,
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
        sync,
        synthetic_blocks,
        synthetic_database,
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


# ---- the database at scale: insert, save, load --------------------------------------------------------------

INSERT_BATCH = 100
INSERT_CASES = {"new": "insert 100 new keys", "mixed": "insert 100 keys: 25 merges, 25 conflicts, 50 new"}
MIXED_MAX_KEYS = 100_000  # a mixed batch copies centers and points (rows change in the middle): 2 x 3 GB at 1M
PERSIST_KEYS = [1_000, 10_000, 100_000]
DB_RADIUS = 4.0  # a tenth of the distance between two synthetic keys (about sqrt(2 x 768) = 39)


def memory_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 2**62


def fits(n_keys: int, copies: float) -> bool:
    """Whether ``copies`` float32 [n_keys, DIM] tensors fit in the memory available now (with 2 GiB spare)."""
    return n_keys * DIM * 4 * copies + 2 * 2**30 < memory_available()


class Stream:
    """An editor's database growing by inserts into copies, and the batches that feed it."""

    def __init__(self, n_keys: int, num_blocks: int = 1000, seed: int = 0):
        self.db = synthetic_database(DIM, n_keys, num_blocks, radius=DB_RADIUS, seed=seed)
        self.block = num_blocks - 1  # the block the inserted batches route to (any trained one will do)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed + 7)
        self.round = 0
        self.keys = self.labels = None
        self.insert()  # the first insert after tensors were written directly copies them into growable buffers

    def next_batch(self, case: str) -> None:
        """Draw this round's batch: ``new`` keys far from every stored one, or a ``mixed`` batch."""
        self.round += 1
        fresh = torch.randn(INSERT_BATCH, DIM, generator=self.generator).to(DEVICE)
        labels = [(2, self.round)] * INSERT_BATCH
        if case == "mixed":  # 50 keys beside stored keys of the filled label (0,): 25 with it, 25 with another
            db = self.db
            owner = torch.searchsorted(db.point_offsets[1:], torch.arange(len(db), device=DEVICE), right=True)
            filled = (db.cluster_labels[owner] == db.labels.index((0,))).nonzero()[:, 0].tolist()
            picks = torch.tensor(self.rng.sample(filled, 50), device=DEVICE)
            noise = torch.randn(50, DIM, generator=self.generator).to(DEVICE)
            noise *= 0.5 * DB_RADIUS / noise.norm(dim=1, keepdim=True)  # beyond the coincide tolerance, within reach
            fresh[:50] = db.points[picks] + noise
            labels = [(0,)] * 25 + [(3, self.round)] * 25 + labels[50:]
        self.keys, self.labels = fresh, labels

    def insert(self):
        if self.keys is None:
            self.next_batch("new")
        database = self.db.copy()
        counts = database.insert(self.keys, self.labels, self.block)
        self.db = database
        sync()
        return counts

    def search(self):
        result = self.db.search(self.keys)
        sync()
        return result


def insert_cases():
    for n_keys in KEYS:
        for case in INSERT_CASES:
            if case == "mixed" and n_keys > MIXED_MAX_KEYS:
                continue
            yield pytest.param(n_keys, case, id=f"C{n_keys}-{case}")


@pytest.fixture(scope="module")
def streams():
    cache = One()
    yield cache
    cache.value = None


@pytest.mark.parametrize(("n_keys", "case"), list(insert_cases()))
def test_insert_scaling(benchmark, streams, n_keys, case):
    if not fits(n_keys, 4.5):  # the filled tensor, two buffers with 25% room, the search's copy of a block
        pytest.skip(f"{n_keys:,} keys x {DIM} need about {n_keys * DIM * 4 * 4.5 / 2**30:.0f} GiB; not available now")
    stream = streams.get(n_keys, lambda: Stream(n_keys))
    counts = []
    bench(benchmark, lambda: counts.append(stream.insert()), group=f"insert vs search {DEVICE} d={DIM} C={n_keys:,}",
          case=INSERT_CASES[case], baseline=INSERT_CASES["new"], target_s=1.0, min_rounds=5,
          setup=lambda: stream.next_batch(case),
          paired=(f"vecdb_search of the same {INSERT_BATCH} keys ({default_backend()})", stream.search),
          plot="db_scaling", x=n_keys, series=INSERT_CASES[case], op="vecdb_insert", C=n_keys, d=DIM,
          Q=INSERT_BATCH, dtype=torch.float32, backend=default_backend())
    last = counts[-1]
    if case == "new":
        assert last.new_clusters == INSERT_BATCH, vars(last)
    else:
        assert (last.merged, last.conflicts, last.new_clusters) == (25, 25, 50), vars(last)
    benchmark.extra_info["process_peak_rss_bytes"] = peak_rss()


@pytest.fixture(scope="module")
def saved_editors(bert, tmp_path_factory):
    """A BERT-base editor holding C keys (and C/10 blocks, at most 1000), its save, and a torch.save of the same
    tensors; one C at a time."""
    model, _, _ = bert
    cache = One()
    root = tmp_path_factory.mktemp("saves")

    def make(n_keys):
        def build():
            if getattr(model, "_melo_editor", None) is not None:
                melo_fast.unpatch(model)
            editor = melo_fast.patch(model, MeloConfig(init_radius=DB_RADIUS))
            blocks = min(MAX_BLOCKS, max(1, n_keys // EDITS_PER_BLOCK))
            database = Stream(n_keys, num_blocks=blocks).db  # separate points and centers, as edits leave them
            # A label per cluster, as after real edits (a 4-token target each): the JSON holds them all.
            database.cluster_labels = torch.arange(database.num_clusters, device=DEVICE)
            database.labels = [(1000 + i % 30_000, 17, i // 30_000, 42) for i in range(database.num_clusters)]
            editor.replace_state(database, synthetic_blocks(editor, blocks))
            path, plain = root / f"save{n_keys}", root / f"plain{n_keys}.pt"
            editor.save(path)
            torch.save(plain_tensors(editor), plain)
            return editor, path, plain

        return cache.get(n_keys, build)

    yield make
    cache.value = None
    if getattr(model, "_melo_editor", None) is not None:
        melo_fast.unpatch(model)


def plain_tensors(editor) -> dict[str, torch.Tensor]:
    """The tensors an editor's save holds, under the same names (for the torch.save baseline)."""
    tensors = {f"db.{name}": t for name, t in editor.db.state_dict()[0].items()}
    for name, (A, B) in editor.blocks().items():
        tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = A, B
    return tensors


def torch_save_synced(tensors, path) -> None:
    torch.save(tensors, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # editor.save fsyncs its files: compare like with like


@pytest.mark.parametrize("n_keys", PERSIST_KEYS, ids=[f"C{n}" for n in PERSIST_KEYS])
def test_save_scaling(benchmark, saved_editors, n_keys):
    editor, path, plain = saved_editors(n_keys)
    tensors = plain_tensors(editor)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    bench(benchmark, lambda: editor.save(path), group=f"save {DEVICE} C={n_keys:,}", case="editor.save",
          baseline="editor.save", target_s=2.0, min_rounds=3, paired=("torch.save + fsync", lambda: torch_save_synced(
              tensors, plain)), plot="db_scaling", x=n_keys, series="save (editor.save)", op="save", C=n_keys,
          d=DIM, bytes=size, blocks=editor.num_blocks)


@pytest.mark.parametrize("n_keys", PERSIST_KEYS, ids=[f"C{n}" for n in PERSIST_KEYS])
def test_load_scaling(benchmark, saved_editors, n_keys):
    editor, path, plain = saved_editors(n_keys)
    bench(benchmark, lambda: editor.reload(path), group=f"load {DEVICE} C={n_keys:,}", case="editor.reload",
          baseline="editor.reload", target_s=2.0, min_rounds=3,
          paired=("torch.load", lambda: torch.load(plain, weights_only=True)), plot="db_scaling", x=n_keys,
          series="load (editor.reload)", op="load", C=n_keys, d=DIM, blocks=editor.num_blocks)
    assert len(editor.db) == n_keys + INSERT_BATCH
