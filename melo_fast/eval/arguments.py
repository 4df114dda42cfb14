"""Command-line arguments shared by ``python -m melo_fast demo`` and ``eval``, and the paper's presets.

Turns parsed arguments into what the protocol takes: records (:func:`load_or_exit`), MeloConfig
fields (:func:`config_overrides`, :func:`preset`).
"""

from __future__ import annotations

import argparse

import torch

from melo_fast.config import MeloConfig
from melo_fast.eval.data import DataError, EditRecord, load_records
from melo_fast.eval.harness import METHODS

PRESETS: dict[str, tuple[dict, int]] = {
    # DESIGN §1 "Paper settings": router → targets, blocks × rank, edits per batch, init_radius, lr.
    # MeloConfig.scale is the effective scale, which in the MELO paper's released implementation equals
    # its num_block.
    "t5-small-ssm-nq": (
        dict(
            router="encoder.block.4.layer.1.DenseReluDense.wo",
            targets=[
                "encoder.block.5.layer.1.DenseReluDense.wo",
                "encoder.block.6.layer.1.DenseReluDense.wo",
                "decoder.block.5.layer.2.DenseReluDense.wo",
                "decoder.block.6.layer.2.DenseReluDense.wo",
            ],
            rank_per_block=2, scale=20.0, init_radius=75.0, edit_lr=1e-2,
        ),
        100,
    ),
    "scotus-bert": (
        dict(
            router="encoder.layer.4.output.dense",
            targets=[f"encoder.layer.{i}.output.dense" for i in (9, 10, 11)],
            rank_per_block=4, scale=100.0, init_radius=0.1, edit_lr=1e-2,
        ),
        50,
    ),
    "gpt2-xl": (
        dict(
            router="transformer.h.35.mlp.c_fc",
            targets=["transformer.h.36.mlp.c_fc", "transformer.h.37.mlp.c_fc"],
            rank_per_block=2, scale=350.0, init_radius=0.5, edit_lr=1e-3,
        ),
        4,
    ),
}


def preset(name: str) -> tuple[MeloConfig, int]:
    """``(MeloConfig, edits per batch)`` of one of the paper's three configurations."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    fields, batch_size = PRESETS[name]
    return MeloConfig(**fields), batch_size


def load_or_exit(path, limit) -> list[EditRecord]:
    """``load_records`` for the command line: a bad data file ends the run with its message, no traceback."""
    try:
        return load_records(path, limit)
    except DataError as err:
        raise SystemExit(f"melo_fast: {err}") from None


def add_common_arguments(parser, batch_size_default: int | None = 10) -> None:
    """Arguments shared by ``demo`` and ``eval``."""
    parser.add_argument("--data", default=None,
                        help="KnowEdit-format JSON file (zsRE, WikiData counterfact/recent, ...; default: the "
                             "shipped demo set)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N records")
    parser.add_argument("--batch-size", type=int, default=batch_size_default, help="edits per batch")
    parser.add_argument("--num-iter", type=int, default=None, help="optimization steps per batch (MeloConfig)")
    parser.add_argument("--init-radius", default=None,
                        help="MeloConfig.init_radius: 'auto' (melo_fast's scale-free default: relative_radius "
                             "x the model's key scale on built-in neutral prompts) or an absolute number")
    parser.add_argument("--key-position", default=None,
                        help="'last', 'mean' or an int token index (-1: what MELO's released implementation uses)")
    parser.add_argument("--router", default=None, help="MeloConfig.router (module name or unique suffix)")
    parser.add_argument("--targets", default=None, help="MeloConfig.targets, comma-separated module names")
    parser.add_argument("--scale", type=float, default=None, help="MeloConfig.scale (effective block scale)")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction of records never edited (locality)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ", ".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="melo_out", help="output folder (JSON report, PNG plot)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="ask every question (edits, probes) as a user turn of the model's chat template "
                             "(generative models with one; default: the demo's choice for SmolLM2, off for eval)")
    parser.add_argument("--key-projection", default=None,
                        help="route MELO through this key projection (python -m melo_fast projection); its router "
                             "and key position become MeloConfig's")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a busy shared machine)")


def apply_threads(args) -> None:
    """Honour ``--threads`` (torch's intra-op CPU threads)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def key_projection(args):
    """The ``--key-projection`` file's :class:`~melo_fast.KeyProjection`, or None; a missing or bad file ends the
    run with its message."""
    if not getattr(args, "key_projection", None):
        return None
    from melo_fast.routing.key_projection import KeyProjection

    try:
        return KeyProjection.load(args.key_projection)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"--key-projection: {err}") from None


def with_projection(config: MeloConfig, args, projection) -> MeloConfig:
    """``config`` patched with ``projection``'s router and key position, where ``--router``/``--key-position``
    did not name them (a named one that differs is refused by ``melo_fast.patch``); ``config`` if None."""
    if projection is None:
        return config
    return config.replace(router=args.router or projection.router,
                          key_position=parse_key_position(args.key_position) or projection.key_position)


def config_overrides(args) -> dict:
    """The MeloConfig fields given on the command line (None: keep the preset's / demo's value)."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()] if args.targets else None
    radius = args.init_radius
    if args.init_radius not in (None, "auto"):
        try:
            radius = float(args.init_radius)
        except ValueError:
            raise ValueError(f"--init-radius must be a number or 'auto', got {args.init_radius!r}") from None
    changes = {"num_iter": args.num_iter, "init_radius": radius, "router": args.router,
               "targets": targets, "scale": args.scale, "key_position": parse_key_position(args.key_position)}
    return {k: v for k, v in changes.items() if v is not None}


def parse_key_position(value):
    """``"last"``/``"mean"`` stay strings; an integer string becomes an int token index."""
    if value is None or value in ("last", "mean"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--key-position must be 'last', 'mean' or an int, got {value!r}") from None


def recorded_arguments(args) -> dict:
    """The parsed command-line arguments as recorded in a JSON report (so a report says how it was made)."""
    return {key: value for key, value in sorted(vars(args).items()) if not callable(value)}
