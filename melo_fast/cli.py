"""``python -m melo_fast {demo,eval,env}``."""

from __future__ import annotations

import argparse
import platform


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


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m melo_fast``; each command sets ``run`` (``args.run(args)``)."""
    parser = argparse.ArgumentParser(prog="python -m melo_fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from melo_fast.eval import demo, evaluate

    demo.add_arguments(commands.add_parser("demo", help="edit a real pretrained model on real data and report"))
    evaluate.add_arguments(commands.add_parser("eval", help="MELO metrics and baselines on a local HF model"))
    commands.add_parser("env", help="versions and available op backends").set_defaults(run=_env)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
