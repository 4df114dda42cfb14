"""KeyProjection: a trained map of router keys into a space where the wordings of one question are close.

MELO routes by the router's raw activations, where two wordings of one question ("Who wrote X?", "X was
written by") often lie farther apart than two different questions about one subject. So an edit's
scope either misses its paraphrases or, made wide enough to reach them, takes in its neighbours. A key
projection is a linear metric learned once per model (and router) on groups of paraphrases with hard
negatives (``melo_fast.editing.key_projection_training``)::

    key' = normalize(W ((key - mean) / std))      key [N, d] float32  ->  key' [N, rank] float32, unit norm

``mean`` and ``std`` are the training keys' per-dimension statistics (fixed before training, so ``W``
learns only the metric); the database then compares unit vectors, whose Euclidean distance is a
monotone function of their cosine. The projection carries the radius chosen on facts it never trained
on (the largest that kept held-out questions out of other edits' scopes, under the database's conflict
rule it records), which the editor uses for ``init_radius="auto"``, and one per number of paraphrases,
chosen the same way for edits given in several wordings (``paraphrase_radii``,
:meth:`KeyProjection.radius_for`, :mod:`melo_fast.vecdb.wordings`).

A projection belongs to one key function: the router module and key position it was trained on, which
the editor checks. It is part of the published :class:`~melo_fast.routing.EditState` (the database
holds projected keys), so it is saved, reloaded and exported with the edits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from melo_fast.vecdb.database import CONFLICT_RULES

METADATA_KEY = "melo_fast_key_projection"


class KeyProjection(nn.Module):
    """``keys [N, d] -> normalize(((keys - mean) / std) @ weight.T) [N, rank]``, float32 unit rows.

    Args:
        mean: ``[d]`` float32, the training keys' mean.
        std: ``[d]`` float32 > 0, their per-dimension standard deviation.
        weight: ``[rank, d]`` float32, the learned map.
        radius: the cluster radius for projected keys (``init_radius="auto"``), in ``(0, 2]`` (the
            distance between two unit vectors is at most 2).
        router: the router module name the keys came from (``MeloConfig.router``).
        key_position: the key position they were read at (``MeloConfig.key_position``).
        info: what training recorded (figures on its validation facts, counts, seconds); JSON values.
        paraphrase_radii: per number of paraphrases ``k >= 1``, the radius of an edit given with ``k``
            paraphrases (``edit_texts(..., paraphrases=...)``), each in ``(0, 2]``; None: ``radius`` for all.
        conflict_rule: the database rule the radii were chosen under (``VectorDatabase``'s
            ``conflict_rule``), which an editor with ``MeloConfig.conflict_rule="auto"`` then uses.

    Raises:
        ValueError: shapes that do not fit together, a non-positive or non-finite std, or a radius
            outside ``(0, 2]``.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        weight: torch.Tensor,
        radius: float,
        router: str,
        key_position: str | int,
        info: dict | None = None,
        paraphrase_radii: Mapping[int, float] | None = None,
        conflict_rule: str = "split",
    ):
        super().__init__()
        if conflict_rule not in CONFLICT_RULES:
            raise ValueError(f"melo_fast: a KeyProjection's conflict_rule must be one of {CONFLICT_RULES}, got "
                             f"{conflict_rule!r}")
        if weight.dim() != 2 or mean.shape != (weight.shape[1],) or std.shape != mean.shape:
            raise ValueError(
                f"melo_fast: a KeyProjection needs mean [d], std [d] and weight [rank, d]; got "
                f"{tuple(mean.shape)}, {tuple(std.shape)}, {tuple(weight.shape)}"
            )
        if not bool(torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("melo_fast: a KeyProjection's std must be finite and > 0 in every dimension")
        paraphrase_radii = {int(k): float(r) for k, r in (paraphrase_radii or {}).items()}
        for name, value in (("radius", radius), *((f"paraphrase_radii[{k}]", r) for k, r in paraphrase_radii.items())):
            if not 0 < value <= 2:
                raise ValueError(f"melo_fast: a KeyProjection's {name} must be in (0, 2] (unit keys), got {value}")
        if any(k < 1 for k in paraphrase_radii):
            raise ValueError(f"melo_fast: paraphrase_radii maps a number of paraphrases >= 1 to a radius, got "
                             f"{sorted(paraphrase_radii)}")
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())
        self.register_buffer("weight", weight.detach().float().clone())
        self.radius = float(radius)
        self.paraphrase_radii = dict(sorted(paraphrase_radii.items()))
        self.router = router
        self.key_position = key_position
        self.info = dict(info or {})
        self.conflict_rule = conflict_rule

    def radius_for(self, paraphrases: int) -> float:
        """The radius of an edit given with ``paraphrases`` paraphrases: that of the largest number calibrated
        up to it (:attr:`radius` for none; beyond the largest calibrated, its radius: more wordings would
        reach wider still, so their locality may fall a little below the target)."""
        calibrated = [k for k in self.paraphrase_radii if k <= paraphrases]
        return self.paraphrase_radii[calibrated[-1]] if calibrated else self.radius

    @property
    def in_dim(self) -> int:
        """``d``: the router's key width."""
        return self.weight.shape[1]

    @property
    def out_dim(self) -> int:
        """``rank``: the width of projected keys (the database's key width)."""
        return self.weight.shape[0]

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """``[N, d]`` keys (any float dtype, any device) → ``[N, rank]`` float32 unit keys on the keys' device."""
        if keys.dim() != 2 or keys.shape[1] != self.in_dim:
            raise ValueError(
                f"melo_fast: the key projection takes [N, {self.in_dim}] keys of router {self.router!r}, got "
                f"{tuple(keys.shape)}"
            )
        mean, std, weight = (t.to(keys.device) for t in (self.mean, self.std, self.weight))
        return nn.functional.normalize(((keys.float() - mean) / std) @ weight.T, dim=-1)

    def check_fits(self, router: str, key_position: str | int, key_width: int) -> None:
        """Refuse to project the keys of another key function than the one this projection was trained on.

        Raises:
            ValueError: another router, key position or key width; the message names both.
        """
        here = (router, key_position, key_width)
        trained = (self.router, self.key_position, self.in_dim)
        if here != trained:
            raise ValueError(
                f"melo_fast: this key projection was trained on the keys of router {self.router!r} at key position "
                f"{self.key_position!r} ({self.in_dim} wide), but the model is patched with router {router!r} at "
                f"{key_position!r} ({key_width} wide). Patch with MeloConfig(router={self.router!r}, "
                f"key_position={self.key_position!r}), or train a projection for this router"
            )

    def copy_to(self, device) -> KeyProjection:
        """An independent copy on ``device`` (a published edit state keeps its own)."""
        return KeyProjection.from_data(self.tensors(), json.loads(json.dumps(self.meta()))).to(device)

    # --- as data -------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std, "weight": self.weight}

    def meta(self) -> dict:
        """Everything but the tensors, as JSON values."""
        return {"radius": self.radius, "paraphrase_radii": {str(k): r for k, r in self.paraphrase_radii.items()},
                "router": self.router, "key_position": self.key_position, "info": self.info,
                "conflict_rule": self.conflict_rule}

    @classmethod
    def from_data(cls, tensors: dict[str, torch.Tensor], meta: dict) -> KeyProjection:
        """The projection of :meth:`tensors` and :meth:`meta` (as a save holds them)."""
        return cls(
            tensors["mean"], tensors["std"], tensors["weight"], meta["radius"], meta["router"], meta["key_position"],
            meta.get("info"), meta.get("paraphrase_radii"),
            meta.get("conflict_rule", "split"),  # projections saved before the rule was recorded used MELO's
        )

    def save(self, path) -> None:
        """Write the projection to one safetensors file (the tensors; the rest as its metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.meta())})

    @classmethod
    def load(cls, path) -> KeyProjection:
        """The projection :meth:`save` wrote to ``path`` (on the CPU).

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a saved key projection.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"melo_fast: no key projection file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
            meta = json.loads(metadata[METADATA_KEY])
            return cls.from_data(tensors, meta)
        except (KeyError, TypeError, json.JSONDecodeError, OSError, RuntimeError, SafetensorError) as err:
            raise ValueError(f"melo_fast: {path} is not a key projection saved by KeyProjection.save: {err}") from err

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}, router={self.router!r}, key_position={self.key_position!r}, " \
               f"radius={self.radius:.4g}, paraphrase_radii={self.paraphrase_radii}, " \
               f"conflict_rule={self.conflict_rule!r}"
