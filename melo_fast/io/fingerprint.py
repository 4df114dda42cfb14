"""The fingerprint of the model a save was made on, so that a save never loads silently onto other weights.

A save's database holds one model's keys (its router outputs). On a model with other weights, even of
the same architecture, an edited prompt gives another key and routes to no edit, and the blocks were
trained for other targets: the save loads, and nothing works. So a save records, for the router and
every target, the weight's shape and ``SAMPLE_SIZE`` of its entries at fixed pseudo-random positions
(the same positions for every weight of one size), as float32. Loading compares the shapes exactly and
the samples with a relative tolerance:

- a copy of the same weights in another dtype or on another device passes: bf16 rounds each entry to
  2⁻⁹ relative at most (fp16 to 2⁻¹²), far below ``TOLERANCE``;
- other weights fail: a re-initialized or differently trained weight, or the same layer index of a
  model with another layer count, differs by the order of the weights themselves (relative ~1).

Weights changed a little on purpose (a short fine-tune) may fail too; ``check_model=False`` on load
and reload skips the comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

SAMPLE_SIZE = 256
SEED = 0x6D656C6F  # any fixed value: the positions only have to be the same when saving and loading
TOLERANCE = 1e-2  # relative L2 difference of the samples


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """``[SAMPLE_SIZE]`` float32 entries of ``weight`` (any shape, dtype, device) at positions fixed by its size."""
    positions = torch.randint(weight.numel(), (SAMPLE_SIZE,), generator=torch.Generator().manual_seed(SEED))
    return weight.detach().reshape(-1)[positions.to(weight.device)].float().cpu()


@dataclass(frozen=True)
class Fingerprint:
    """What a save records of its model.

    Attributes:
        model_type: the model's ``config.model_type``, or None.
        shapes: module name → its weight's shape (the router and every target).
        samples: module name → ``[SAMPLE_SIZE]`` float32 CPU entries of its weight.
    """

    model_type: str | None
    shapes: dict[str, tuple[int, ...]]
    samples: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, names: list[str]) -> Fingerprint:
        """The fingerprint of ``model``'s modules ``names`` (full names; each has a ``weight``)."""
        modules = dict(model.named_modules())
        weights = {name: modules[name].weight for name in dict.fromkeys(names)}  # the router may be a target
        return cls(
            getattr(getattr(model, "config", None), "model_type", None),
            {name: tuple(weight.shape) for name, weight in weights.items()},
            {name: _sample(weight) for name, weight in weights.items()},
        )

    def differences(self, here: Fingerprint) -> list[str]:
        """What differs between this (a save's) fingerprint and the model's ``here``; empty if they match."""
        found = []
        if self.model_type and here.model_type and self.model_type != here.model_type:
            found.append(f"model type: saved {self.model_type!r}, here {here.model_type!r}")
        for name, shape in self.shapes.items():
            if name not in here.shapes:
                found.append(f"{name}: not in this model")
            elif here.shapes[name] != shape:
                found.append(f"{name}: weight shape saved {list(shape)}, here {list(here.shapes[name])}")
            else:
                saved, now = self.samples[name], here.samples[name]
                difference = float((now - saved).norm()) / max(float(saved.norm()), float(now.norm()), 1e-30)
                if not difference <= TOLERANCE:  # NaN counts as different
                    found.append(
                        f"{name}: other weights (relative difference {difference:.3g} over {SAMPLE_SIZE} sampled "
                        f"entries; a copy in another dtype stays below {TOLERANCE:g})"
                    )
        return found

    # --- in a save: the shapes in its config JSON, the samples in its weights file ----------------------
    def to_save(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, meta)``: ``fingerprint.<name>`` samples for the weights file, the rest JSON-able."""
        tensors = {f"fingerprint.{name}": sample for name, sample in self.samples.items()}
        meta = {"model_type": self.model_type, "shapes": {name: list(s) for name, s in self.shapes.items()}}
        return tensors, meta

    @classmethod
    def from_save(cls, tensors: Mapping[str, torch.Tensor], meta: dict) -> Fingerprint:
        """Inverse of :meth:`to_save`. Raises ValueError/KeyError/TypeError when the two do not fit."""
        shapes = {name: tuple(int(d) for d in shape) for name, shape in meta["shapes"].items()}
        samples = {name: tensors[f"fingerprint.{name}"] for name in shapes}
        for name, sample in samples.items():
            if tuple(sample.shape) != (SAMPLE_SIZE,):
                raise ValueError(f"the fingerprint of {name!r} has shape {tuple(sample.shape)}, not [{SAMPLE_SIZE}]")
        return cls(meta.get("model_type"), shapes, samples)
