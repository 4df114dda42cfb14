"""MeloConfig, the one JSON face of three parts that live differently, plus the op backend.

- :class:`PatchSpec`: what is patched (router, targets, rank, key position, scale). Fixed while the
  model stays patched; a saved edit state fits only a model patched the same way, which is what
  ``editor.reload`` compares.
- :class:`TrainSettings`: how one block is trained (Adam's learning rate, steps, StepLR schedule, when to
  stop early, the frozen-prefix replay). Read at each edit, so
  ``editor.config = editor.config.replace(num_iter=10)`` changes the next edit (the only part a live
  editor lets change).
- :class:`RadiusPolicy`: how the radius of a new cluster is chosen (absolute, or relative to the
  measured key scale), and what a conflict with another edit's cluster does to it. The radius it
  resolves to, and the rule, live in one place, the database (``VectorDatabase.init_radius``,
  ``conflict_rule``), and are saved with the edits.
- ``backend``: which op backend runs here; a property of the process, not of the edits (a save made
  with one backend loads with any).

Users write and save the flat fields of :class:`MeloConfig`; the parts are read from it and validate
their own fields. A config is frozen once made (``replace`` gives a changed copy): an editor's config
always describes what is patched, and a bad value is refused when the config is made, not at the edit
that would use it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from melo_fast.ops import BACKENDS
from melo_fast.vecdb.database import CONFLICT_RULES

KEY_POSITIONS = ("last", "mean")


def _fail(name: str, value, allowed: str):
    raise ValueError(f"MeloConfig.{name}={value!r} is invalid: {allowed}")


def _positive_number(value) -> bool:
    """A finite number > 0 (an infinite scale or radius is as unusable as a negative one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class PatchSpec:
    """What is patched (see :class:`MeloConfig` for each field); ``targets`` is a tuple here."""

    router: str | None
    targets: tuple[str, ...] | None
    rank_per_block: int
    key_position: str | int
    scale: float

    def __post_init__(self):
        if self.router is not None and (not isinstance(self.router, str) or not self.router):
            _fail("router", self.router, "give a module name (str) or None for the model's default")
        if self.targets is not None:
            targets = (self.targets,) if isinstance(self.targets, str) else self.targets
            if not targets or not all(isinstance(t, str) and t for t in targets):
                _fail("targets", self.targets, "give a non-empty list of module names or None for the model's default")
            if len(set(targets)) != len(targets):
                _fail("targets", self.targets, "module names must be distinct")
            object.__setattr__(self, "targets", tuple(targets))
        if not _positive_int(self.rank_per_block):
            _fail("rank_per_block", self.rank_per_block, "must be an int >= 1")
        if isinstance(self.key_position, bool) or not (
            self.key_position in KEY_POSITIONS or isinstance(self.key_position, int)
        ):
            _fail("key_position", self.key_position, f"must be one of {KEY_POSITIONS} or an int token index")
        if not _positive_number(self.scale):
            _fail("scale", self.scale, "must be a number > 0")

    def differences(self, other: PatchSpec) -> list[str]:
        """``"field: saved X, here Y"`` for every field where ``other`` (a save's) differs from this one."""

        def shown(value):
            return list(value) if isinstance(value, tuple) else value

        return [
            f"{f.name}: saved {shown(getattr(other, f.name))!r}, here {shown(getattr(self, f.name))!r}"
            for f in dataclasses.fields(self)
            if getattr(other, f.name) != getattr(self, f.name)
        ]


@dataclass(frozen=True)
class TrainSettings:
    """How one block is trained (see :class:`MeloConfig` for each field)."""

    edit_lr: float
    num_iter: int
    stop_loss: float | None
    min_iter: int
    cache_frozen_prefix: bool
    continuation_tokens: int
    prefix_rows: int
    scheduler_step: int
    scheduler_gamma: float

    def __post_init__(self):
        # Adam's steps are about lr in size whatever the gradient's scale: above 1 one step outweighs
        # the block's own initial values (kaiming A: ~1/sqrt(d_in); B: 0), so training would diverge.
        if not _positive_number(self.edit_lr) or self.edit_lr > 1:
            _fail("edit_lr", self.edit_lr, "must be a number in (0, 1] (Adam's steps are lr-sized)")
        if not _positive_int(self.num_iter):
            _fail("num_iter", self.num_iter, "must be an int >= 1")
        if self.stop_loss is not None and not _positive_number(self.stop_loss):
            _fail("stop_loss", self.stop_loss, "must be a number > 0, or None for MELO's fixed num_iter steps")
        if not (isinstance(self.min_iter, int) and not isinstance(self.min_iter, bool)) or not (
            0 <= self.min_iter <= self.num_iter
        ):
            _fail("min_iter", self.min_iter, f"must be an int in [0, num_iter={self.num_iter}]")
        if not isinstance(self.cache_frozen_prefix, bool):
            _fail("cache_frozen_prefix", self.cache_frozen_prefix, "must be True or False")
        if isinstance(self.continuation_tokens, bool) or not isinstance(self.continuation_tokens, int) or (
            self.continuation_tokens < 0
        ):
            _fail("continuation_tokens", self.continuation_tokens, "must be an int >= 0 (0: train on the target only)")
        if isinstance(self.prefix_rows, bool) or not isinstance(self.prefix_rows, int) or self.prefix_rows < 0:
            _fail("prefix_rows", self.prefix_rows, "must be an int >= 0 (0: train on the rows as given)")
        if not isinstance(self.scheduler_step, int) or self.scheduler_step < 1:
            _fail("scheduler_step", self.scheduler_step, "must be an int >= 1")
        if not _positive_number(self.scheduler_gamma) or self.scheduler_gamma > 1:
            _fail("scheduler_gamma", self.scheduler_gamma, "must be a number in (0, 1]")


@dataclass(frozen=True)
class RadiusPolicy:
    """How a new cluster's radius is chosen (see :class:`MeloConfig` for each field)."""

    init_radius: float | str
    relative_radius: float
    conflict_rule: str

    def __post_init__(self):
        if self.init_radius != "auto" and not _positive_number(self.init_radius):
            _fail("init_radius", self.init_radius, 'must be "auto" (scale-free, the default) or an absolute radius > 0')
        if not _positive_number(self.relative_radius):
            _fail("relative_radius", self.relative_radius, "must be a number > 0")
        if self.conflict_rule not in ("auto", *CONFLICT_RULES):
            _fail("conflict_rule", self.conflict_rule, f"must be \"auto\" or one of {CONFLICT_RULES}")

    def conflict_rule_for(self, projection) -> str:
        """The database's conflict rule when routing through ``projection`` (a KeyProjection or None).

        ``"auto"``: the projection's own rule while its radius is used (``init_radius="auto"``), since its
        radii were chosen on held-out questions under that rule; MELO's ``"split"`` otherwise.
        """
        if self.conflict_rule != "auto":
            return self.conflict_rule
        return projection.conflict_rule if projection is not None and self.init_radius == "auto" else "split"

    @property
    def absolute(self) -> float | None:
        """The absolute radius, or None when it is measured (``"auto"``)."""
        return None if self.init_radius == "auto" else float(self.init_radius)

    def from_key_scale(self, key_scale: float) -> float:
        """The ``"auto"`` radius for a model whose key scale is ``key_scale`` (``melo_fast.editing.calibration``)."""
        return self.relative_radius * key_scale


@dataclass(frozen=True)
class MeloConfig:
    """Configuration of one patched model; frozen (change a copy: :meth:`replace`).

    Attributes:
        router: name of the module whose output gives each input's key (MELO's "grace layer").
            ``None``: found from the model's structure (see ``melo_fast.targets``).
            A suffix is enough when it is unique (``"h.3.mlp.c_fc"``).
        targets: names of the ``nn.Linear`` / HF ``Conv1D`` modules that get a block LoRA (a list or
            a single name may be given; kept as a tuple). ``None``: found from the model's structure.
        rank_per_block: rank ``k`` of one block (one edit batch trains one block).
        init_radius: radius of a new cluster in the key space (Euclidean). ``"auto"`` (default):
            ``relative_radius`` × the model's key scale, measured once before the first edit on
            built-in neutral prompts (``melo_fast.editing.calibration``), so it holds at any key scale and
            in bf16. A number is an absolute radius, MELO's own setting (0.5 for GPT2-XL, 75 for T5).
            With a key projection (``melo_fast.patch(..., key_projection=...)``), ``"auto"`` is the radius
            the projection chose when it was trained (``KeyProjection.radius``).
        relative_radius: the radius as a fraction of the key scale when ``init_radius="auto"``.
        conflict_rule: what an edit's key does to a nearby cluster of another edit
            (``VectorDatabase``): ``"split"``, MELO's rule (both radii shrink to half their distance,
            points left outside are forgotten); ``"voronoi"``, both keep their radii and a query goes to
            the nearer one. ``"auto"`` (default): the key projection's rule while its radius is used
            (projections trained by ``train_key_projection`` choose their radii under ``"voronoi"``),
            ``"split"`` otherwise.
        key_position: which token of an input gives its key: ``"last"`` real token (default),
            ``"mean"`` over real tokens, or an int index into the padded sequence (``-1`` is what
            the MELO paper's released implementation uses). For causal-LM edits the prompt
            (labels == -100) is the sequence.
        edit_lr: Adam learning rate of one edit, in (0, 1].
        num_iter: the most optimization steps per edit batch (MELO: always this many).
        stop_loss: stop an edit before ``num_iter`` steps once every target token is the model's
            argmax (teacher-forced) and the loss is below this (``melo_fast.editing.convergence``).
            ``None``: MELO's fixed loop of ``num_iter`` steps.
        min_iter: optimization steps taken before the early stop may end the loop.
        cache_frozen_prefix: compute the blocks below the first target once per edit batch and replay
            them at every training step (``melo_fast.editing.frozen_prefix``; exact, checked on the
            first step).
        continuation_tokens: decoder-only models: also train the block on the unedited model's own
            greedy continuation of prompt + target, up to this many tokens, so an edited answer states
            the new fact and goes on as the model would instead of repeating the target
            (``melo_fast.editing.continuation``); the loss is then the target tokens' mean plus the
            continuation tokens' mean, so the target is learned as fast as without it. 0: the target
            tokens only (MELO).
        prefix_rows: decoder-only models: also train the block on this many copies of each row behind a
            short unrelated sentence (``melo_fast.editing.prefixed_rows``), so a routed input in another
            context (a paraphrase, a system prompt) also gets the new answer; keys come from the rows as
            given. Needs the tokenizer. 0: the rows as given (MELO).
        scheduler_step: StepLR step size.
        scheduler_gamma: StepLR decay.
        scale: effective scale ``s`` of a block: output ``W x + s (x A_b) B_b``. In the MELO paper's
            released implementation the effective scale equals its fixed block count (20 for zsRE,
            100 for SCOTUS, 350 for GPT2-XL); with growable capacity there is no block count, so
            the default is 20.
        backend: op backend (``"reference"``, ``"torch"``, ``"cpp"``, ``"triton"``) or ``None``
            to choose the fastest one for the device.

    The fields group into :attr:`patch_spec` (router, targets, rank_per_block, key_position, scale),
    :attr:`train_settings` (edit_lr, num_iter, stop_loss, min_iter, cache_frozen_prefix, continuation_tokens,
    prefix_rows, scheduler_step, scheduler_gamma) and
    :attr:`radius_policy` (init_radius, relative_radius, conflict_rule), plus ``backend``.
    """

    router: str | None = None
    targets: tuple[str, ...] | None = None
    rank_per_block: int = 4
    init_radius: float | str = "auto"
    relative_radius: float = 0.1
    conflict_rule: str = "auto"
    key_position: str | int = "last"
    edit_lr: float = 1e-2
    num_iter: int = 50
    stop_loss: float | None = 0.05
    min_iter: int = 1
    cache_frozen_prefix: bool = True
    continuation_tokens: int = 8
    prefix_rows: int = 0
    scheduler_step: int = 20
    scheduler_gamma: float = 0.5
    scale: float = 20.0
    backend: str | None = None

    def __post_init__(self):
        # A single name, or a list (JSON gives one): kept as a tuple, so a frozen config stays unchanged.
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        elif isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        self.validate()

    def validate(self) -> None:
        """Check every field (done when the config is made).

        Raises:
            ValueError: a field has a bad value; the message names the field, the value and what is
                allowed.
        """
        for part in (PatchSpec, TrainSettings, RadiusPolicy):
            part(**self._fields_of(part))  # each part validates its own fields
        if self.backend is not None and self.backend not in BACKENDS:
            _fail("backend", self.backend, f"must be one of {BACKENDS} or None (automatic)")

    @property
    def patch_spec(self) -> PatchSpec:
        return PatchSpec(**self._fields_of(PatchSpec))

    @property
    def train_settings(self) -> TrainSettings:
        return TrainSettings(**self._fields_of(TrainSettings))

    @property
    def radius_policy(self) -> RadiusPolicy:
        return RadiusPolicy(**self._fields_of(RadiusPolicy))

    def _fields_of(self, part) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(part)}

    def to_dict(self) -> dict:
        """The fields as plain JSON values (``targets`` as a list)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if data["targets"] is not None:
            data["targets"] = list(data["targets"])
        return data

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
