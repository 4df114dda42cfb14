"""Save and load the whole edit state of a patched model: config, blocks and database.

A save folder holds ``melo_config.json`` (format version, MeloConfig, database metadata) and
``melo_edits.safetensors`` (every trained block of every target and the database tensors).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from melo_fast.config import MeloConfig

FORMAT_VERSION = 1
CONFIG_FILE = "melo_config.json"
WEIGHTS_FILE = "melo_edits.safetensors"


def save(editor, path) -> None:
    """Write ``editor``'s state to folder ``path`` atomically (temp folder, then rename).

    An existing folder at ``path`` is replaced only once the new one is complete.
    """
    if editor.block_is_open:
        raise RuntimeError("melo_fast: commit() or abort() the open block before saving")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db_tensors, db_meta = editor.db.state_dict()
    tensors = {f"db.{name}": tensor.contiguous() for name, tensor in db_tensors.items()}
    for name, layer in editor.lora_layers.items():
        tensors[f"lora.{name}.A"] = layer.bank_A[: editor.num_blocks].contiguous()
        tensors[f"lora.{name}.B"] = layer.bank_B[: editor.num_blocks].contiguous()
    from melo_fast import __version__

    meta = {
        "format_version": FORMAT_VERSION,
        "melo_fast_version": __version__,
        "model_type": getattr(getattr(editor.model, "config", None), "model_type", None),
        "num_blocks": editor.num_blocks,
        "config": editor.config.to_dict(),
        "database": db_meta,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_meta(path) -> dict:
    """The checked metadata of save folder ``path``."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"melo_fast: {path} is not a melo_fast save folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"melo_fast: {config_file} is corrupt: {err}") from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(
            f"melo_fast: {path} has save format version {version!r}; this melo_fast reads version {FORMAT_VERSION}"
        )
    return meta


def load(model: nn.Module, path):
    """Patch ``model`` with the config saved in ``path`` and restore every block and the database.

    Returns the model's :class:`~melo_fast.MeloEditor`. On any error the model is left unpatched.
    """
    from melo_fast.patching import patch, unpatch

    meta = read_meta(path)
    editor = patch(model, MeloConfig.from_dict(meta["config"]))
    try:
        tensors = load_file(str(Path(path) / WEIGHTS_FILE))
        num_blocks = int(meta["num_blocks"])
        for name, layer in editor.lora_layers.items():
            A, B = tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"]
            expected_A, expected_B = (num_blocks, layer.rank, layer.d_in), (num_blocks, layer.rank, layer.d_out)
            if tuple(A.shape) != expected_A or tuple(B.shape) != expected_B:
                raise ValueError(
                    f"blocks of {name!r} have shapes {tuple(A.shape)}/{tuple(B.shape)}, this model needs "
                    f"{expected_A}/{expected_B}: the save belongs to another model"
                )
            layer.reserve(num_blocks)
            with torch.no_grad():
                layer.bank_A[:num_blocks] = A.to(layer.bank_A)
                layer.bank_B[:num_blocks] = B.to(layer.bank_B)
            layer.num_blocks = num_blocks
        db_tensors = {name[len("db.") :]: t for name, t in tensors.items() if name.startswith("db.")}
        editor.db.load_state_dict(db_tensors, meta["database"])
        editor.num_blocks = num_blocks
    except (KeyError, ValueError, RuntimeError) as err:
        unpatch(model)
        raise ValueError(f"melo_fast: cannot load edits from {path}: {err}") from err
    return editor
