"""``python -m melo_fast {demo,eval,projection,env,inspect}``."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def _env(_args) -> None:
    """Print versions and which op backends work here, and why not."""
    import torch
    import transformers

    import melo_fast
    from melo_fast.ops import backend_status

    print(
        f"melo_fast {melo_fast.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}"
    )
    print(f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    for name, status in backend_status().items():
        print(f"  backend {name:<9} {status}")


def _inspect(args) -> None:
    """Print which router and targets ``patch()`` would choose for a local model folder, and why.

    The model is built from ``config.json`` on the meta device: no weights are read or allocated (the
    choice depends on the structure only), so this is instant even for very large models.
    """
    import torch
    import transformers

    from melo_fast.patching import supported_module_names
    from melo_fast.targets import NoDefaultModules, choose_modules

    folder = Path(args.model_dir)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"melo_fast inspect: {folder} has no config.json; give a local Hugging Face model folder")
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"melo_fast inspect: cannot read {folder / 'config.json'}: {err}") from err
    architectures = getattr(config, "architectures", None) or []
    model_class = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    with torch.device("meta"):
        if model_class is not None:
            model, names = model_class(config), "its module names"
        else:  # the bare model: its names are suffixes of every head class's names, which patch() accepts
            model = transformers.AutoModel.from_config(config)
            names = "no architectures in config.json, so the bare model; its names also match any head class"
    print(
        f"{folder}: {type(model).__name__} (model_type {config.model_type!r}; {names}), built from config.json "
        "on the meta device: no weights are read, the choice depends on the structure only"
    )
    try:
        choice = choose_modules(model)
    except NoDefaultModules as err:
        names = supported_module_names(model)
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise SystemExit(
            f"{err}\npatch() needs MeloConfig(router=..., targets=[...]) here; nn.Linear/Conv1D modules: {shown}"
        ) from err
    print(choice.describe())


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m melo_fast``; each command sets ``run`` (``args.run(args)``)."""
    parser = argparse.ArgumentParser(prog="python -m melo_fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from melo_fast.eval import demo, evaluate, projection_command

    demo.add_arguments(commands.add_parser("demo", help="edit a real pretrained model on real data and report"))
    evaluate.add_arguments(commands.add_parser("eval", help="MELO metrics and baselines on a local HF model"))
    projection_command.add_arguments(commands.add_parser(
        "projection", help="train a key projection (edits that reach paraphrases) on a KnowEdit file"))
    commands.add_parser("env", help="versions and available op backends").set_defaults(run=_env)
    inspect = commands.add_parser("inspect", help="which router and targets patch() chooses for a model, and why")
    inspect.add_argument("model_dir", help="local Hugging Face model folder (config.json; weights are not needed)")
    inspect.set_defaults(run=_inspect)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
