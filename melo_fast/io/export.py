"""Export committed blocks as standard PEFT LoRA adapters, with ``route()`` choosing the adapter per input.

A MELO block is an ordinary rank-k LoRA: block ``b`` adds ``s * (x @ A[b].T) @ B[b]`` to each target
(``A [k, d_in]``, ``B [k, d_out]``), and PEFT's LoRA adds ``(lora_alpha / r) * lora_B(lora_A(x))``
(``lora_A.weight [r, d_in]``, ``lora_B.weight [d_out, r]``). So block ``b`` is the PEFT adapter with
``r = k``, ``lora_A.weight = A[b]``, ``lora_B.weight = B[b].T`` and ``lora_alpha = s * k``, whose
``lora_alpha / r`` is ``s`` (exactly for MELO's integer scales; :func:`lora_alpha`). HF ``Conv1D`` targets (GPT-2) get
``fan_in_fan_out: true``, which only matters to PEFT's weight merging; the LoRA weights keep the shapes
above. Any engine that serves PEFT adapters can then serve the edits: PEFT's own mixed-batch forward
(``model(**inputs, adapter_names=editor.adapter_names(inputs))``), vLLM, SGLang, LoRAX. What MELO adds
is the choice of adapter per input, ``editor.route()``, named by :func:`adapter_names`.
``MeloEditor.export_peft`` and ``MeloEditor.adapter_names`` call this module with a :class:`Snapshot`
of the editor's committed edits.

An export folder::

    path/
      melo_export.json    the manifest: block id -> adapter name, the scale, every file of the export
      block_0000/         one PEFT adapter per exported block (adapter_config.json, adapter_model.safetensors)
      block_0001/         (the name is the adapter name: PeftModel.save_pretrained lays out adapters so too)
      routing/            a melo_fast save (config, every block, database, key projection if any):
                          melo_fast.load(model, path/"routing") gives an editor whose adapter_names(inputs)
                          select among these adapters

Guarantees of :func:`export_peft` (the rules of ``checkpoint.write``, for a folder of folders):

- never destructive: ``path`` must be new, an empty folder, or an earlier export (a folder holding
  ``melo_export.json``) that contains only the files its manifest lists; a file, a foreign non-empty
  folder, an earlier export with files of someone else's inside, or one whose manifest is unreadable or
  lists a file melo_fast does not write there (``../notes.txt``, an absolute path) is refused untouched
  (``FileExistsError``). Replacing an earlier export deletes only files that export's own manifest lists
  and removes folders only once empty, so a file added during the export is never lost;
- all or nothing: the new export is written and fsynced in full in a hidden sibling folder
  (``.NAME.melo-export-XXXX``) and published by one rename: onto a new or empty ``path`` with
  ``rename(2)``, and onto an earlier export with Linux ``renameat2(RENAME_EXCHANGE)``, which swaps the two
  folders in one atomic step. At every instant ``path`` holds what it held before (nothing, an empty
  folder, the old export) or the complete new export; a failure or a crash at any step leaves it so,
  plus at worst a hidden sibling folder to delete. Where the OS or file system cannot exchange (not
  Linux, or e.g. some network file systems) the old export is renamed aside and the new one renamed in:
  a failure between the two renames puts the old one back (and if even that fails, both stay complete
  beside ``path``), but a crash (power loss) exactly between them leaves ``path`` absent with both
  exports complete beside it (``.NAME.melo-export-old-XXXX`` and ``.NAME.melo-export-XXXX``): nothing
  lost, one rename to undo by hand;
- files get the usual permissions (0644 under the usual umask; folders 0755), like ``save_pretrained``.

Not guaranteed: a reader that loads an adapter *while* an export replaces the folder may read one file
of the old export and one of the new. Serve from folders that do not change: export each version to a
new path (engines cache adapters by id anyway) or replace only between loads.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from melo_fast.config import MeloConfig
from melo_fast.io import checkpoint
from melo_fast.io.files import fsync_folder, refuse_foreign_destination
from melo_fast.io.fingerprint import Fingerprint
from melo_fast.routing.state import EditState
from melo_fast.targets import ModelKind
from melo_fast.version import __version__

BASE_ADAPTER = "__base__"  # PEFT's adapter_names marker for "no adapter" (the unedited model)
MANIFEST = "melo_export.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ROUTING = "routing"
FORMAT_VERSION = 1
_KIND = "melo_fast PEFT export"


def adapter_name(block_id: int) -> str:
    """The adapter name (and subfolder) of block ``block_id``: ``block_0007``."""
    return f"block_{block_id:04d}"


def adapter_names(block_ids: list[int]) -> list[str]:
    """The PEFT adapter name of each routed block id: its block's, or ``"__base__"`` for -1 (no edit applies).

    Plugs into PEFT's mixed-batch forward and generate: ``peft_model(**inputs, adapter_names=...)``.
    A row routed to a block that an export with ``blocks=[...]`` left out names an adapter that export
    does not hold (``exported_adapters`` lists those it holds).
    """
    return [adapter_name(b) if b >= 0 else BASE_ADAPTER for b in block_ids]


@dataclass(frozen=True)
class Snapshot:
    """What an export writes: one published edit state of a patched model, read without a commit in between.

    Attributes:
        model: the patched model (its module names and config).
        config: the config it was patched with.
        kind: what kind of model it is (the adapters' ``task_type``).
        state: the published edit state.
        blocks: every target's blocks of ``state`` on the host: name → ``(A [n, k, d_in], B [n, k, d_out])``.
        fingerprint: the model's, recorded in the routing save.
    """

    model: nn.Module
    config: MeloConfig
    kind: ModelKind
    state: EditState
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fingerprint: Fingerprint


def lora_alpha(scale: float, rank: int) -> float:
    """The ``lora_alpha`` whose PEFT/vLLM scaling ``lora_alpha / rank`` reproduces ``scale``: ``scale * rank``.

    The quotient is exactly ``scale`` for integer scales such as MELO's (the block count: 20, 100,
    350) and for power-of-two ranks. For other pairs it can be one float64 ulp off (0.1 with rank 3:
    0.30000000000000004 / 3), and then no float alpha hits ``scale`` exactly (0.3 / 3 misses on the other
    side); one ulp (1e-16 relative) is far below the resolution of the float32/bf16 the engines compute
    the scaled product in, so the float32 scale is the same.
    """
    return scale * rank


def export_peft(snapshot: Snapshot, path, blocks: Iterable[int] | None = None) -> dict[int, str]:
    """Write committed blocks of ``snapshot`` as PEFT LoRA adapters, plus the routing, to folder ``path``.

    Args:
        snapshot: the committed edits (``MeloEditor.export_peft`` takes it; an open block is not part of it).
        path: the export folder (module docstring: layout and guarantees).
        blocks: block ids to export; None exports every committed block.

    Returns:
        ``{block_id: adapter_name}`` of the adapters written.

    Raises:
        FileExistsError: ``path`` is not a place an export may be written (nothing changed).
        ValueError: a bad ``blocks`` entry, or targets PEFT cannot name exactly (nothing changed).
    """
    path = Path(path).resolve()
    replacing = refuse_foreign_destination(path, MANIFEST, _KIND, "export")
    if replacing:
        _refuse_foreign_files(path)
    chosen = _chosen_blocks(blocks, snapshot.state.num_blocks)
    target_modules = _target_modules(snapshot.model, snapshot.config.targets)
    in_cwd = path.is_dir() and os.path.samefile(path, os.getcwd())

    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".{path.name}.melo-export-{secrets.token_hex(6)}"
    staged.mkdir()
    try:
        names = _write_export(staged, snapshot, chosen, target_modules)
    except BaseException:
        _discard(staged)
        raise
    replaced = _publish(staged, path, replacing)
    fsync_folder(path.parent)
    if in_cwd:
        os.chdir(path)  # the process was inside the folder that was replaced: move it into the new one
    if replaced is not None:
        _remove_export(replaced)
    return names


def exported_adapters(path) -> dict[int, str]:
    """``{block_id: adapter_name}`` of export ``path``, each adapter's files checked to be there."""
    path = Path(path)
    manifest = _read_manifest(path)
    adapters = {int(block): name for block, name in manifest["adapters"].items()}
    for name in adapters.values():
        for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if not (path / name / file).is_file():
                raise FileNotFoundError(f"melo_fast: {path / name / file} is missing (named by {path / MANIFEST})")
    return adapters


# --- what is exported ------------------------------------------------------------------------
def _chosen_blocks(blocks: Iterable[int] | None, num_blocks: int) -> list[int]:
    if blocks is None:
        return list(range(num_blocks))
    chosen = list(blocks)
    for block in chosen:
        if not isinstance(block, int) or isinstance(block, bool) or not 0 <= block < num_blocks:
            raise ValueError(
                f"melo_fast: cannot export block {block!r}: the editor has blocks 0..{num_blocks - 1} "
                f"({num_blocks} committed)"
            )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"melo_fast: blocks {chosen} name a block more than once")
    return sorted(chosen)


def _target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """PEFT ``target_modules``: the targets' full names, checked to select exactly these modules.

    PEFT selects a module whose name is in the list or ends with ``"." + entry``; a full name can
    still be the tail of a deeper module's name, which would get an adapter too.
    """
    if callable(getattr(type(model), "get_base_model", None)):
        raise ValueError(
            "melo_fast: export_peft writes adapters for the Hugging Face model itself, but this editor patched a "
            "PEFT model, whose own adapter would be missing from every export. Merge it (merge_and_unload()), "
            "patch the merged model and edit there"
        )
    targets = list(targets)
    names = [name for name, _ in model.named_modules()]
    for target in targets:
        others = [name for name in names if name != target and name.endswith("." + target)]
        if others:
            raise ValueError(
                f"melo_fast: PEFT's target_modules entry {target!r} would also select {others}; PEFT cannot "
                "name this target alone. Choose targets whose full names are not the tail of another module's name"
            )
    return targets


def _adapter_config(snapshot: Snapshot, target_modules: list[str]) -> dict:
    model, config, kind = snapshot.model, snapshot.config, snapshot.kind
    modules = dict(model.named_modules())
    task_type = "CAUSAL_LM" if kind.causal_lm else "SEQ_2_SEQ_LM" if kind.seq2seq else None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.rank_per_block,
        "lora_alpha": lora_alpha(config.scale, config.rank_per_block),
        "use_rslora": False,
        "target_modules": target_modules,
        "fan_in_fan_out": all(isinstance(modules[name], Conv1D) for name in target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


# --- writing ---------------------------------------------------------------------------------
def _write_export(staged: Path, snapshot: Snapshot, chosen: list[int], target_modules) -> dict[int, str]:
    adapter_config = json.dumps(_adapter_config(snapshot, target_modules), indent=2).encode()
    all_blocks = snapshot.blocks
    names = {}
    for block in tqdm(chosen, desc="export", unit="adapter", disable=len(chosen) < 64):
        name = adapter_name(block)
        folder = staged / name
        folder.mkdir()
        tensors = {}
        for target in target_modules:
            A, B = all_blocks[target]
            tensors[f"base_model.model.{target}.lora_A.weight"] = A[block].detach().cpu().contiguous()
            tensors[f"base_model.model.{target}.lora_B.weight"] = B[block].detach().cpu().T.contiguous()
        _write_file(folder / ADAPTER_WEIGHTS, safetensors_bytes(tensors, metadata={"format": "pt"}))
        _write_file(folder / ADAPTER_CONFIG, adapter_config)
        fsync_folder(folder)
        names[block] = name
    model_type = snapshot.fingerprint.model_type
    checkpoint.write(
        staged / ROUTING, snapshot.config, snapshot.state.database, all_blocks, snapshot.fingerprint,
        snapshot.state.projection,
    )
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    manifest = {
        "format": _KIND,
        "format_version": FORMAT_VERSION,
        "melo_fast_version": __version__,
        "model_type": model_type,
        "scale": snapshot.config.scale,
        "rank_per_block": snapshot.config.rank_per_block,
        "target_modules": target_modules,
        "adapters": {str(block): name for block, name in names.items()},
        "routing": ROUTING,
        "files": files,
    }
    _write_file(staged / MANIFEST, json.dumps(manifest, indent=2).encode())
    fsync_folder(staged)
    return names


def _write_file(path: Path, data: bytes) -> None:
    # open() applies the umask (0644 as usual), unlike safetensors' own writer (owner-only).
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# --- publishing ------------------------------------------------------------------------------
def _publish(staged: Path, path: Path, replacing: bool) -> Path | None:
    """Move the complete export ``staged`` to ``path`` in one step; return where the replaced export went.

    On failure ``path`` is as it was and ``staged`` is discarded; if undoing a half-done step fails
    too, nothing more is touched (both exports stay complete where they are).
    """
    if not replacing:
        try:
            # rename(2) onto an absent path or an empty folder; it fails, changing nothing, if the
            # folder got entries meanwhile.
            os.replace(staged, path)
        except BaseException:
            _discard(staged)
            raise
        return None
    try:
        exchanged = _exchange(staged, path)
    except BaseException:
        _discard(staged)
        raise
    if exchanged:
        if (staged / MANIFEST).is_file():
            return staged
        _exchange(staged, path)  # what was swapped out is no export: someone replaced it meanwhile; give it back
        _discard(staged)
        raise FileExistsError(f"melo_fast: {path} changed during the export and is no longer an export; kept it")
    aside = path.parent / f".{path.name}.melo-export-old-{secrets.token_hex(6)}"
    try:
        os.rename(path, aside)
    except BaseException:
        _discard(staged)
        raise
    try:
        os.rename(staged, path)
    except BaseException:
        os.rename(aside, path)  # if this fails too, the error propagates and both exports stay complete
        _discard(staged)
        raise
    return aside


def _discard(staged: Path) -> None:
    """Delete our own unpublished staging folder (nobody else writes into its random hidden name)."""
    shutil.rmtree(staged, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries at ``a`` and ``b`` atomically; False (nothing changed) where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # no such call, or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(b))


# --- the manifest: which files are an export's own ----------------------------------------------
# Every file an export writes, relative to its folder. The manifest comes from inside the folder: one
# changed by hand or by another program could list ``../notes.txt`` or an absolute path, which replacing
# the export would delete, so a manifest listing anything else is refused.
_OWN_FILE = re.compile(
    rf"block_[0-9]{{4,}}/({re.escape(ADAPTER_CONFIG)}|{re.escape(ADAPTER_WEIGHTS)})"
    rf"|{re.escape(ROUTING)}/({re.escape(checkpoint.CONFIG_FILE)}|{checkpoint.WEIGHTS_NAME.pattern})"
)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"melo_fast: {path} is not a melo_fast export ({MANIFEST} is missing)")
    try:
        manifest = json.loads(file.read_text())
        if manifest.get("format") != _KIND or manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('format_version')!r}")
        if not isinstance(manifest["files"], list) or not isinstance(manifest["adapters"], dict):
            raise ValueError("no list of files or map of adapters")
        foreign = [f for f in manifest["files"] if not (isinstance(f, str) and _OWN_FILE.fullmatch(f))]
        foreign += [name for block, name in manifest["adapters"].items() if name != adapter_name(int(block))]
        if foreign:
            raise ValueError(f"it lists {foreign[0]!r}, which is not a file or adapter melo_fast writes in an export")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError) as err:
        raise ValueError(
            f"melo_fast: {file} is not a readable manifest of this melo_fast's exports "
            f"(format version {FORMAT_VERSION}): {err}"
        ) from err
    return manifest


def _entries(folder: Path) -> tuple[set[str], set[str]]:
    """(files, folders) under ``folder``, relative, POSIX separators; links count as files, never followed."""
    files, folders = set(), set()
    for root, dirs, names in os.walk(folder):
        relative = Path(root).relative_to(folder)
        for name in dirs:
            entry = (relative / name).as_posix()
            (files if os.path.islink(Path(root) / name) else folders).add(entry)
        files.update((relative / name).as_posix() for name in names)
    return files, folders


def _own_entries(manifest: dict) -> tuple[set[str], set[str]]:
    files = set(manifest["files"]) | {MANIFEST}
    folders = {parent.as_posix() for file in files for parent in Path(file).parents if parent != Path(".")}
    return files, folders


def _refuse_foreign_files(path: Path) -> None:
    """An earlier export may be replaced only if everything in it is its own (its manifest lists it)."""
    try:
        own_files, own_folders = _own_entries(_read_manifest(path))
    except ValueError as err:
        raise FileExistsError(
            f"{err}. melo_fast cannot tell its own files there from others; nothing was changed. Remove the folder "
            "if it is yours, or choose another path"
        ) from err
    files, folders = _entries(path)
    foreign = sorted((files - own_files) | (folders - own_folders))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"melo_fast: cannot export to {path}: the earlier export there also holds files it did not write "
            f"({shown}). Move them out first; nothing was changed"
        )


def _remove_export(folder: Path) -> None:
    """Delete a replaced export: only the files its manifest lists, then its folders once empty."""
    try:
        files, folders = _own_entries(_read_manifest(folder))
        # Only what a walk that never follows links finds: a subfolder swapped for a link to elsewhere
        # since the check for foreign files is not entered.
        present, _ = _entries(folder)
        for file in sorted((files & present) - {MANIFEST}):
            (folder / file).unlink(missing_ok=True)
        (folder / MANIFEST).unlink()  # last: until here the folder still says what is its own
    except (OSError, ValueError) as err:
        warnings.warn(
            f"melo_fast: the new export is in place, but the replaced one at {folder} could not be removed ({err}); "
            "it was kept",
            stacklevel=3,
        )
        return
    kept = []
    deepest_first = sorted(folders, key=lambda name: name.count("/"), reverse=True)
    for sub in [folder / name for name in deepest_first] + [folder]:
        try:
            sub.rmdir()  # only if empty: whatever someone else put there stays
        except OSError as err:
            kept.append(f"{sub.name}: {err.strerror}")
    if kept:
        warnings.warn(
            f"melo_fast: the new export is in place, but the replaced one at {folder} could not be removed "
            f"completely; what is left there was kept ({'; '.join(kept)})",
            stacklevel=3,
        )
