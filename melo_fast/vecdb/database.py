"""VectorDatabase: MELO's inner vector database, kept as tensors.

Clusters have a center, a radius and a label (the edit's target, compared exactly); points are the
stored keys with the block each one routes to, grouped by cluster (CSR offsets) so a search is one
call to ``melo_fast.ops.vecdb_search``.

Insertion follows the rules of DESIGN §1 plus one deliberate fix, the re-edit rule (DESIGN §2.10):
a new key that coincides with a stored point of another label takes that point over, so correcting
an edit works (MELO's own conflict split at distance 0 would drop both edits). An insert costs one
scan of the centers for the batch, Python work for the batch and the clusters it touches only, and
memory copies of the small tensors (``insert.py``), so editing does not slow down as edits pile up.

Immutability: a database that routing can see is never modified. Its tensors are never written in
place; :meth:`insert` builds new tensors and rebinds them only once the whole batch has been placed
(so a failed insert changes nothing), and the editor inserts into a :meth:`copy` that it then
publishes. That is what lets inference threads search a database while an edit is committed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from melo_fast import ops
from melo_fast.vecdb.insert import COINCIDE_FRACTION, InsertCounts, Placement
from melo_fast.vecdb.scan import exact_distances, squared_norms

# What a key does to a nearby cluster of another label (VectorDatabase's docstring).
CONFLICT_RULES = ("split", "voronoi")


class _LabelTable:
    """The distinct labels of a database and of its copies: append-only, so they can share it.

    A database sees the first ``n`` entries (its own count). It appends in place only while it is
    the table's last writer (``n == len(items)``); otherwise it starts a table of its own. So a copy
    that inserts never changes what the database it came from sees, and :meth:`VectorDatabase.copy`
    stays O(1) however many labels there are.
    """

    def __init__(self, labels: list[tuple[int, ...]]):
        self.items: list[tuple[int, ...]] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.extend(labels)

    def extend(self, labels: list[tuple[int, ...]]) -> None:
        for label in labels:
            self.index.setdefault(label, len(self.items))
            self.items.append(label)


def _checked_radii(radii: Sequence[float], n: int) -> list[float]:
    radii = [float(r) for r in radii]
    bad = [(i, r) for i, r in enumerate(radii) if not (math.isfinite(r) and r > 0)]
    if len(radii) != n or bad:
        raise ValueError(f"VectorDatabase.insert: radii must be {n} finite numbers > 0 (one per key), got "
                         f"{len(radii)}" + (f"; (key, radius) {bad[:5]} are not" if bad else ""))
    return radii


class VectorDatabase:
    """Clusters of keys, each routing to the block of its nearest point.

    Tensors (all on one device, keys in float32):
        centers ``[C, d]``, radii ``[C]``, cluster_labels ``[C]`` int64 (index into ``labels``),
        point_offsets ``[C + 1]`` int64, points ``[P, d]``, point_blocks ``[P]`` int64.
    ``labels`` is the list of distinct edit targets (tuples of ints) seen so far.
    Beside the tensors the database keeps ``||center||²`` and each cluster's reach (its largest point
    distance from the center) for the insert's scan; they are rebuilt with the tensors by
    :meth:`insert`, and recomputed once if anything else replaces the tensors.
    ``init_radius`` is None until it is known (``MeloConfig.init_radius="auto"`` sets it at the first
    edit from ``key_scale``, the model's measured key scale; see ``melo_fast.editing.calibration``).

    ``conflict_rule`` says what a key does to the nearest cluster of another label within reach:

    - ``"split"`` (MELO, DESIGN §1): both radii become half their distance and the old cluster forgets
      the points left outside;
    - ``"voronoi"``: the key makes its own cluster at its full radius and the old cluster is unchanged.
      Search already goes to the nearest center, so where two scopes overlap the nearer edit answers:
      the boundary between them is the bisecting plane, the same line the split draws between the two
      centers, but each scope keeps its reach on every other side, and no stored point is forgotten.
      Why: with many edits nearly every edit conflicts with some neighbour, and the split shrank
      their scopes until nearly a third of the paraphrases inside their own edit's radius routed nowhere
      (SmolLM2 with a key projection, 367 zsRE edits; EVALUATION.md, issue 22). The price: a question
      between two edits goes to the nearer one rather than to none.
    """

    def __init__(
        self,
        dim: int,
        init_radius: float | None,
        device: torch.device | str = "cpu",
        key_scale: float | None = None,
        conflict_rule: str = "split",
    ):
        if conflict_rule not in CONFLICT_RULES:
            raise ValueError(f"VectorDatabase: conflict_rule must be one of {CONFLICT_RULES}, got {conflict_rule!r}")
        self.conflict_rule = conflict_rule
        self.dim = dim
        self.init_radius = None if init_radius is None else float(init_radius)
        self.key_scale = key_scale
        self.device = torch.device(device)
        self.centers = torch.empty(0, dim, device=self.device)
        self.radii = torch.empty(0, device=self.device)
        self.cluster_labels = torch.empty(0, dtype=torch.int64, device=self.device)
        self.point_offsets = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.points = torch.empty(0, dim, device=self.device)
        self.point_blocks = torch.empty(0, dtype=torch.int64, device=self.device)
        self.labels = []
        self._geometry: tuple[torch.Tensor, ...] | None = None  # see _scan_geometry
        self._center_rows = self._point_rows = None  # room to append centers/points (rows.RowBuffer)
        self.conflicts = 0
        self.forgotten = 0
        self.superseded = 0

    def __len__(self) -> int:
        """Number of stored keys (points)."""
        return self.points.shape[0]

    @property
    def num_clusters(self) -> int:
        return self.centers.shape[0]

    @property
    def coincide_tolerance(self) -> float:
        """Distance within which two keys are the same input (see ``COINCIDE_FRACTION``).

        Raises:
            RuntimeError: ``init_radius`` is not known yet (``"auto"`` before the key scale is measured).
        """
        if self.init_radius is None:
            raise RuntimeError("VectorDatabase: init_radius is not set yet")
        return COINCIDE_FRACTION * self.init_radius

    def copy(self) -> VectorDatabase:
        """A database with the same contents that can be inserted into without touching this one.

        O(1): the tensors are shared, which is safe because they are never written in place.
        """
        return copy.copy(self)  # tensors, cached geometry and label table are shared, never modified

    @property
    def labels(self) -> list[tuple[int, ...]]:
        """The distinct edit targets seen so far, in order of first use (``cluster_labels`` index it).

        Setting it replaces the whole list (each label becomes a tuple of ints).

        Raises:
            ValueError: on setting, two labels are equal.
        """
        return self._label_table.items[: self._num_labels]

    @labels.setter
    def labels(self, labels: list[tuple[int, ...]]) -> None:
        labels = [tuple(int(t) for t in label) for label in labels]
        if len(set(labels)) != len(labels):
            raise ValueError("VectorDatabase: labels must be distinct (a cluster label is an index into them)")
        self._label_table = _LabelTable(labels)
        self._num_labels = len(labels)

    def _label_ids(self, labels: list[tuple[int, ...]]) -> tuple[list[int], list[tuple[int, ...]]]:
        """The id of each label, and the labels new to this database (their ids follow the known ones)."""
        index, known = self._label_table.index, self._num_labels
        ids, new = [], {}
        for label in labels:
            found = index.get(label)
            if found is None or found >= known:  # unknown, or added by a copy this one does not see
                found = new.setdefault(label, known + len(new))
            ids.append(found)
        return ids, list(new)

    def _add_labels(self, new: list[tuple[int, ...]]) -> None:
        if not new:
            return
        if len(self._label_table.items) != self._num_labels:  # a database sharing the table appended
            self._label_table = _LabelTable(self._label_table.items[: self._num_labels])
        self._label_table.extend(new)
        self._num_labels += len(new)

    def search(self, queries: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """``[Q, d]`` keys → ``[Q]`` int64 block ids (-1: outside every edit's scope).

        The keys are moved to the database's device; ``backend`` as ``melo_fast.ops.vecdb_search``.

        Raises:
            ValueError: the keys' last dimension is not the database's ``dim``.
        """
        if queries.dim() != 2 or queries.shape[-1] != self.dim:
            raise ValueError(
                f"VectorDatabase.search: keys must be [Q, {self.dim}] for this database, got {tuple(queries.shape)}"
            )
        # The database's own tensors are consistent by construction (insert and from_state_dict build
        # them), so only the keys need checking: the backend is called directly, without the public
        # op's validation of all six tensors on every serving call.
        impl = ops.resolve(backend, self.device)
        return impl.vecdb_search(
            queries.to(self.device), self.centers, self.radii, self.point_offsets, self.points, self.point_blocks
        )

    def stats(self) -> dict:
        """Clusters, points, conflicts, forgotten/superseded points and distinct blocks the points route to."""
        return {
            "clusters": self.num_clusters,
            "points": len(self),
            "conflicts": self.conflicts,
            "forgotten_points": self.forgotten,
            "superseded_points": self.superseded,
            "blocks_used": int(torch.unique(self.point_blocks[self.point_blocks >= 0]).numel()),
        }

    def _scan_geometry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||center||² [C], reach [C])`` of the current tensors (reach: ``-inf`` for a cluster without points).

        Cached with the tensors they were computed from; recomputed (O(P d), once) when the tensors
        were replaced by something other than :meth:`insert` (a load, a benchmark filling them).
        """
        cached = self._geometry
        source = (self.centers, self.points, self.point_offsets)
        if cached is not None and all(a is b for a, b in zip(cached[:3], source, strict=True)):
            return cached[3], cached[4]
        sizes = self.point_offsets[1:] - self.point_offsets[:-1]
        clusters = torch.arange(self.num_clusters, device=self.device)
        owner = torch.repeat_interleave(clusters, sizes, output_size=len(self))
        distance = exact_distances(self.points, torch.arange(len(self), device=self.device), self.centers, owner)
        reach = torch.full((self.num_clusters,), -math.inf, device=self.device)
        reach = reach.scatter_reduce(0, owner, distance, "amax")
        geometry = (self.centers, self.points, self.point_offsets, squared_norms(self.centers), reach)
        self._geometry = geometry
        return geometry[3], geometry[4]

    def insert(
        self,
        keys: torch.Tensor,
        labels: list[tuple[int, ...]],
        block_id: int,
        refuse_clashes: bool = True,
        radii: Sequence[float] | None = None,
    ) -> InsertCounts:
        """Place the keys of one edit batch, all routing to ``block_id``.

        Rules (DESIGN §1 and §2.10), applied in this order:

        1. Re-edits: a key within ``coincide_tolerance`` of its nearest stored point, when that point's
           cluster has another label, supersedes that point: the point is removed, its cluster's center
           and radius are recomputed from the points left (the radius never grows), and a cluster left
           without points is removed. Other stored edits are untouched.
        2. MELO's rules, with each key's nearest cluster computed once for the batch, after step 1:
           far → new cluster; same label → merge (center = mean, radius = max(spread, init_radius));
           other label → conflict split at half the distance, forgetting points left outside
           (``conflict_rule="voronoi"``: a new cluster at the key's radius, the old one unchanged).

        One deliberate widening: a spread used as a radius is widened by twice the rounding bound
        ``gamma_(d+2)`` of a ``d``-term float32 norm (``insert.covering_radius``: a factor
        ``1 + 2k / (1 - k)``, ``k = (d + 2) * 2**-24``; about 4.6e-5 relative at d = 384, 9.2e-5 at
        d = 768), so the farthest point of a merged cluster routes home in every search backend, not
        only in the one that measured it.

        Distances are ``torch.linalg.vector_norm(a - b)`` in float32; ties go to the lowest index.
        Cost: one scan of the centers, work for the batch and the clusters it touches, memory copies;
        a few host synchronizations on CUDA, never one per key (``insert.py``).

        Args:
            keys: ``[N, d]`` float keys of the batch.
            labels: ``N`` edit targets (tuples of ints); equal tuples are the same label.
            block_id: the block the batch trained.
            refuse_clashes: refuse a batch with two keys that coincide (within :attr:`coincide_tolerance`)
                with different labels. False when the caller has refused them already (the editor does,
                with :func:`coinciding_conflicts`, before training), so the batch is not scanned twice.
            radii: ``N`` per-key radii > 0 used in place of ``init_radius`` in the rules above (a key's
                reach, the radius of a cluster it creates, the floor of one it joins); None: ``init_radius``
                for every key (MELO). The editor uses them for an edit stated in several wordings
                (:mod:`melo_fast.vecdb.wordings`). The re-edit rule and :attr:`coincide_tolerance` keep
                ``init_radius``.

        Raises:
            ValueError: bad shapes, radii that are not ``N`` finite numbers > 0, or two keys of the batch
                coincide with different labels (nothing changes).
        """
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"VectorDatabase.insert: keys must be [N, {self.dim}], got {tuple(keys.shape)}")
        if len(labels) != keys.shape[0]:
            raise ValueError(f"VectorDatabase.insert: {keys.shape[0]} keys but {len(labels)} labels")
        if self.init_radius is None:
            raise RuntimeError("VectorDatabase.insert: init_radius is not set yet")
        radii = [self.init_radius] * keys.shape[0] if radii is None else _checked_radii(radii, keys.shape[0])
        if keys.shape[0] == 0:
            return InsertCounts()
        keys = keys.detach().to(self.device, torch.float32).contiguous()
        key_labels, new_labels = self._label_ids([tuple(int(t) for t in label) for label in labels])
        buffers = (self._center_rows, self._point_rows)
        placed = Placement(self, keys, key_labels, block_id, radii, self._scan_geometry(), buffers).run(refuse_clashes)
        # Commit: nothing above touched self, so a failure leaves the database as it was.
        self.centers, self.radii, self.cluster_labels = placed.centers, placed.radii, placed.cluster_labels
        self.point_offsets, self.points, self.point_blocks = placed.point_offsets, placed.points, placed.point_blocks
        self._center_rows, self._point_rows = placed.center_rows, placed.point_rows
        self._geometry = (self.centers, self.points, self.point_offsets, placed.center_sq_norms, placed.reach)
        self._add_labels(new_labels)
        counts = placed.counts
        self.conflicts += counts.conflicts
        self.forgotten += counts.forgotten
        self.superseded += counts.superseded
        return counts

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (for safetensors) and JSON-able metadata that fully describe the database."""
        tensors = {
            "centers": self.centers,
            "radii": self.radii,
            "cluster_labels": self.cluster_labels,
            "point_offsets": self.point_offsets,
            "points": self.points,
            "point_blocks": self.point_blocks,
        }
        meta = {
            "dim": self.dim,
            "init_radius": self.init_radius,
            "key_scale": self.key_scale,
            "conflict_rule": self.conflict_rule,
            "labels": [list(label) for label in self.labels],
            "conflicts": self.conflicts,
            "forgotten": self.forgotten,
            "superseded": self.superseded,
        }
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict, device) -> VectorDatabase:
        """Inverse of :meth:`state_dict`; checks shapes so a corrupt save fails loudly.

        Raises:
            ValueError: a tensor is missing or has the wrong shape, the point offsets do not cover the
                points in order, or a cluster label is outside the saved label list.
            KeyError: ``meta`` lacks a required entry (``dim``, ``labels``, ``init_radius``,
                ``conflicts``, ``forgotten``).
        """
        dim = int(meta["dim"])
        missing = [name for name in _TENSOR_DTYPES if name not in tensors]
        if missing:
            raise ValueError(f"database tensors {missing} are missing")
        n_clusters = tensors["centers"].shape[0]
        n_points = tensors["points"].shape[0]
        expected = {
            "centers": (n_clusters, dim),
            "radii": (n_clusters,),
            "cluster_labels": (n_clusters,),
            "point_offsets": (n_clusters + 1,),
            "points": (n_points, dim),
            "point_blocks": (n_points,),
        }
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                found = tuple(tensors[name].shape)
                raise ValueError(f"database tensor {name!r} has shape {found}, expected {shape}")
        offsets = tensors["point_offsets"]
        if int(offsets[0]) != 0 or int(offsets[-1]) != n_points or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("database point offsets do not cover the points in order")
        labels = [tuple(int(t) for t in label) for label in meta["labels"]]
        cluster_labels = tensors["cluster_labels"]
        if n_clusters and (int(cluster_labels.min()) < 0 or int(cluster_labels.max()) >= len(labels)):
            raise ValueError("database cluster labels point outside the saved label list")
        radius = meta["init_radius"]
        # Saves from before the voronoi rule were all made under MELO's split.
        db = cls(dim, radius, device=device, key_scale=meta.get("key_scale"),
                 conflict_rule=meta.get("conflict_rule", "split"))
        for name, dtype in _TENSOR_DTYPES.items():
            setattr(db, name, tensors[name].to(db.device, dtype))
        db.labels = labels
        db.conflicts = int(meta["conflicts"])
        db.forgotten = int(meta["forgotten"])
        db.superseded = int(meta.get("superseded", 0))
        return db


_TENSOR_DTYPES = {
    "centers": torch.float32,
    "radii": torch.float32,
    "cluster_labels": torch.int64,
    "point_offsets": torch.int64,
    "points": torch.float32,
    "point_blocks": torch.int64,
}
