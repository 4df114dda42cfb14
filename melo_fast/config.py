"""MeloConfig: every knob of a MELO edit, with validation and a JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from melo_fast.ops import BACKENDS

KEY_POSITIONS = ("last", "mean")


@dataclass
class MeloConfig:
    """Configuration of one patched model.

    Attributes:
        router: name of the module whose output gives each input's key (MELO's "grace layer").
            ``None``: found from the model's structure (see ``melo_fast.targets``).
            A suffix is enough when it is unique (``"h.3.mlp.c_fc"``).
        targets: names of the ``nn.Linear`` / HF ``Conv1D`` modules that get a block LoRA.
            ``None``: found from the model's structure.
        rank_per_block: rank ``k`` of one block (one edit batch trains one block).
        init_radius: radius of a new cluster in the key space (Euclidean). ``"auto"`` (default):
            ``relative_radius`` × the model's key scale, measured once before the first edit on
            built-in neutral prompts (``melo_fast.calibration``), so it holds at any key scale and in
            bf16. A number is an absolute radius, MELO's own setting (0.5 for GPT2-XL, 75 for T5).
        relative_radius: the radius as a fraction of the key scale when ``init_radius="auto"``.
        key_position: which token of an input gives its key: ``"last"`` real token (default),
            ``"mean"`` over real tokens, or an int index into the padded sequence (``-1`` is what
            the MELO paper's released implementation uses). For causal-LM edits the prompt
            (labels == -100) is the sequence.
        edit_lr: Adam learning rate of one edit.
        num_iter: the most optimization steps per edit batch (MELO: always this many).
        stop_loss: stop an edit early, before ``num_iter`` steps, once every target token is the
            model's argmax (teacher-forced) and the loss is below this (``melo_fast.convergence``).
            ``None``: MELO's fixed loop of ``num_iter`` steps.
        min_iter: optimization steps taken before the early stop may end the loop.
        cache_frozen_prefix: compute the blocks below the first target once per edit batch and replay
            them at every training step (``melo_fast.frozen_prefix``; exact, checked on the first step).
        scheduler_step: StepLR step size.
        scheduler_gamma: StepLR decay.
        scale: effective scale ``s`` of a block: output ``W x + s (x A_b) B_b``. In the MELO paper's
            released implementation the effective scale equals its fixed block count (20 for zsRE,
            100 for SCOTUS, 350 for GPT2-XL); with growable capacity there is no block count, so
            the default is 20.
        backend: op backend (``"reference"``, ``"torch"``, ``"cpp"``, ``"triton"``) or ``None``
            to choose the fastest one for the device.
    """

    router: str | None = None
    targets: list[str] | None = None
    rank_per_block: int = 4
    init_radius: float | str = "auto"
    relative_radius: float = 0.1
    key_position: str | int = "last"
    edit_lr: float = 1e-2
    num_iter: int = 50
    stop_loss: float | None = 0.05
    min_iter: int = 1
    cache_frozen_prefix: bool = True
    scheduler_step: int = 20
    scheduler_gamma: float = 0.5
    scale: float = 20.0
    backend: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (a single target name given as a str becomes a one-item list).

        Raises:
            ValueError: a field has a bad value; the message names the field, the value and what is
                allowed.
        """

        def fail(name, allowed):
            raise ValueError(f"MeloConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if self.router is not None and (not isinstance(self.router, str) or not self.router):
            fail("router", "give a module name (str) or None for the model's default")
        if self.targets is not None:
            if isinstance(self.targets, str):
                self.targets = [self.targets]
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                fail("targets", "give a non-empty list of module names or None for the model's default")
            if len(set(self.targets)) != len(self.targets):
                fail("targets", "module names must be distinct")
        if not isinstance(self.rank_per_block, int) or isinstance(self.rank_per_block, bool) or self.rank_per_block < 1:
            fail("rank_per_block", "must be an int >= 1")
        if self.init_radius != "auto" and not _positive_number(self.init_radius):
            fail("init_radius", 'must be "auto" (scale-free, the default) or an absolute radius > 0')
        if not _positive_number(self.relative_radius):
            fail("relative_radius", "must be a number > 0")
        if isinstance(self.key_position, bool) or not (
            self.key_position in KEY_POSITIONS or isinstance(self.key_position, int)
        ):
            fail("key_position", f"must be one of {KEY_POSITIONS} or an int token index")
        if not _positive_number(self.edit_lr):
            fail("edit_lr", "must be a number > 0")
        if not isinstance(self.num_iter, int) or isinstance(self.num_iter, bool) or self.num_iter < 1:
            fail("num_iter", "must be an int >= 1")
        if self.stop_loss is not None and not _positive_number(self.stop_loss):
            fail("stop_loss", "must be a number > 0, or None for MELO's fixed num_iter steps")
        min_iter_ok = isinstance(self.min_iter, int) and not isinstance(self.min_iter, bool)
        if not min_iter_ok or not 0 <= self.min_iter <= self.num_iter:
            fail("min_iter", f"must be an int in [0, num_iter={self.num_iter}]")
        if not isinstance(self.cache_frozen_prefix, bool):
            fail("cache_frozen_prefix", "must be True or False")
        if not isinstance(self.scheduler_step, int) or self.scheduler_step < 1:
            fail("scheduler_step", "must be an int >= 1")
        if not _positive_number(self.scheduler_gamma) or self.scheduler_gamma > 1:
            fail("scheduler_gamma", "must be a number in (0, 1]")
        if not _positive_number(self.scale):
            fail("scale", "must be a number > 0")
        if self.backend is not None and self.backend not in BACKENDS:
            fail("backend", f"must be one of {BACKENDS} or None (automatic)")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> MeloConfig:
        """The config of a :meth:`to_dict` dict; fields left out take their defaults.

        Raises:
            ValueError: a key that is not a field (the message lists the known fields), or a bad value
                (:meth:`validate`).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"MeloConfig: unknown field(s) {sorted(unknown)}; known fields are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MeloConfig:
        """The config of a :meth:`to_json` text.

        Raises:
            ValueError: the text is not JSON (``json.JSONDecodeError``, a ``ValueError``), or as
                :meth:`from_dict`.
        """
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> MeloConfig:
        """A new config with ``changes`` applied; this one is not modified.

        Raises:
            ValueError: as :meth:`from_dict` (an unknown field name or a bad value).
        """
        return MeloConfig.from_dict({**self.to_dict(), **changes})


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
