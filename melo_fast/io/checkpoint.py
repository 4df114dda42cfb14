"""The on-disk form of an edit state: config, blocks and database, written so no data is ever lost.

A save folder holds ``melo_config.json`` (format version, MeloConfig, database metadata, the name of
the weights file, and checksums) and ``melo_edits.<id>.safetensors`` (every block of every target and
the database tensors). Edits keyed through a :class:`~melo_fast.routing.key_projection.KeyProjection`
also hold it: its tensors as ``key_projection.*`` and the rest as the config's ``"key_projection"``.

The model's fingerprint (``"model_fingerprint"`` in the config, its samples as ``fingerprint.*``
tensors in the weights file; ``melo_fast.io.fingerprint``) says which model the edits were made on;
the loader compares it with the model (``melo_fast.editing.restore.check_model``). Saves without one
are not compared.

Checksums (``"sha256"`` in ``melo_config.json``): the SHA-256 of the weights file, and of the config's
own contents (every other entry, as JSON with sorted keys and no spaces). :func:`read` verifies both
before it parses anything, so a flipped byte anywhere in a save is an error naming the file, not a
changed block value or edit label. Saves written before checksums were recorded (no ``"sha256"``)
are read unchecked.

Guarantees of :func:`write`:

- it never deletes or replaces anything that is not its own: the path must be a new folder, an
  empty folder, or an earlier melo_fast save (a folder holding ``melo_config.json``); a file, or a
  non-empty folder of something else, is refused untouched, and so is a save whose config names a
  weights file that is not a name :func:`write` gives (:func:`weights_file`);
- replacing an earlier save is atomic, also against a crash or a failure at any step: the new
  weights go to a new file, then ``melo_config.json`` is replaced in one ``os.replace`` (the commit
  point), and only then is the old weights file removed. So the path always holds a complete save,
  the old one or the new one; at worst a crash leaves an unreferenced weights file behind;
- files get the usual permissions (0644 under the usual umask; folders 0755), like ``save_pretrained``.

:func:`read` checks everything that can be checked without the model (checksums included) and names
the file and the problem in its errors. A reader racing a writer may find that the weights file its
config named was just replaced and deleted; it then reads the new config again, up to ``READ_TRIES``
times in all.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from melo_fast.config import MeloConfig
from melo_fast.io import files
from melo_fast.io.fingerprint import Fingerprint
from melo_fast.routing.key_projection import KeyProjection
from melo_fast.vecdb import VectorDatabase
from melo_fast.version import __version__

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "melo_config.json"
VERSION_1_WEIGHTS = "melo_edits.safetensors"
WEIGHTS_NAME = re.compile(r"melo_edits\.[0-9a-f]{12}\.safetensors")  # what write() names its weights file
READ_TRIES = 5  # reads of the config by a reader that keeps finding its weights file replaced
CHECKSUMS = "sha256"  # the config's entry: file name -> SHA-256 hex
PROJECTION = "key_projection"  # the config's entry and the weights' prefix of a key projection


@dataclass
class SavedEdits:
    """A save folder's contents, checked for internal consistency (not yet against a model).

    Attributes:
        config: the MeloConfig the edits were made with.
        num_blocks: number of trained blocks.
        blocks: target name → ``(A [num_blocks, k, d_in], B [num_blocks, k, d_out])`` CPU tensors.
        database: the vector database, on CPU.
        fingerprint: the model the edits were made on, or None (a save from before fingerprints).
        meta: the raw metadata of ``melo_config.json``.
        projection: the key projection the database's keys went through, or None.
    """

    config: MeloConfig
    num_blocks: int
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    database: VectorDatabase
    fingerprint: Fingerprint | None
    meta: dict
    projection: KeyProjection | None = None


def write(
    path,
    config: MeloConfig,
    database: VectorDatabase,
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fingerprint: Fingerprint,
    projection: KeyProjection | None = None,
) -> None:
    """Write an edit state made with ``config`` to folder ``path``.

    Args:
        database: the vector database.
        blocks: target name → ``(A [n, k, d_in], B [n, k, d_out])``, the same ``n`` for every target.
        fingerprint: the model's (``Fingerprint.of(model, [router, *targets])``).
        projection: the key projection the database's keys went through, or None.
    """
    path = Path(path)
    previous_weights = _check_destination(path)
    path.mkdir(parents=True, exist_ok=True)

    db_tensors, db_meta = database.state_dict()
    tensors = {f"db.{name}": tensor for name, tensor in db_tensors.items()}
    for name, (A, B) in blocks.items():
        tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = A, B
    fingerprint_tensors, fingerprint_meta = fingerprint.to_save()
    tensors.update(fingerprint_tensors)
    if projection is not None:
        tensors.update({f"{PROJECTION}.{name}": t for name, t in projection.tensors().items()})
    num_blocks = next(iter(blocks.values()))[0].shape[0] if blocks else 0
    weights_name = f"melo_edits.{secrets.token_hex(6)}.safetensors"
    meta = {
        "format_version": FORMAT_VERSION,
        "melo_fast_version": __version__,
        "model_type": fingerprint.model_type,
        "num_blocks": num_blocks,
        "weights_file": weights_name,
        "config": config.to_dict(),
        "database": db_meta,
        "model_fingerprint": fingerprint_meta,
    }
    if projection is not None:
        meta[PROJECTION] = projection.meta()
    weights_path, config_tmp = path / weights_name, path / f".{CONFIG_FILE}.{secrets.token_hex(6)}.tmp"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights_path))
        files.fsync_file(weights_path)
        meta = json.loads(json.dumps(meta))  # as a reader will parse it (tuples become lists), for the digest
        meta[CHECKSUMS] = {weights_name: files.sha256_of(weights_path), CONFIG_FILE: _config_digest(meta)}
        with open(config_tmp, "w") as f:
            f.write(json.dumps(meta, indent=2))
            f.flush()
            os.fsync(f.fileno())
        # safetensors creates its file owner-only; give it the mode open() gave the config (umask applied).
        os.chmod(weights_path, stat.S_IMODE(config_tmp.stat().st_mode))
        os.replace(config_tmp, path / CONFIG_FILE)  # the commit point
    except BaseException:
        config_tmp.unlink(missing_ok=True)
        weights_path.unlink(missing_ok=True)
        raise
    files.fsync_folder(path)
    if previous_weights is not None and previous_weights != weights_name:
        (path / previous_weights).unlink(missing_ok=True)


def _check_destination(path: Path) -> str | None:
    """Refuse anything :func:`write` must not overwrite; return the weights file of an earlier save."""
    if not files.refuse_foreign_destination(path, CONFIG_FILE, "melo_fast save", "save"):
        return None
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged earlier save: replace its config, leave its other files alone
    return weights_file(meta, path / CONFIG_FILE) if isinstance(meta, dict) else None


def weights_file(meta: dict, config_file: Path) -> str:
    """The name of the weights file that config ``meta`` names, refused unless :func:`write` gives such names.

    The name comes from inside the folder, so a config changed by hand or by another program could
    name ``../notes.txt`` or an absolute path: a save would delete that file, a load would read it.
    """
    name = meta.get("weights_file", VERSION_1_WEIGHTS)
    if name != VERSION_1_WEIGHTS and not (isinstance(name, str) and WEIGHTS_NAME.fullmatch(name)):
        raise ValueError(
            f"melo_fast: {config_file} names the weights file {name!r}, which is not a name melo_fast writes "
            "(melo_edits.<12 hex digits>.safetensors), so it is neither read nor deleted; the config was changed "
            "by something else. Remove the folder or choose another path; nothing was changed"
        )
    return name


def _config_digest(meta: dict) -> str:
    """SHA-256 of a config's entries other than the checksums, as canonical JSON (sorted keys, no spaces)."""
    entries = {key: value for key, value in meta.items() if key != CHECKSUMS}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_sha256(file: Path, actual: str, recorded) -> None:
    if actual != recorded:
        raise ValueError(
            f"melo_fast: {file} is corrupted (changed since it was saved: damaged on disk or in transfer, or edited "
            f"by hand): its SHA-256 is not the one {CONFIG_FILE} recorded. Save the edits again, or restore the file "
            "from a good copy"
        )


def read(path) -> SavedEdits:
    """Read and check save folder ``path`` (the checksums first). Errors name the file and what is wrong with it."""
    path = Path(path)
    weights = None
    for _ in range(READ_TRIES):
        meta = _read_meta(path)
        named = path / weights_file(meta, path / CONFIG_FILE)
        if named == weights:  # the config still names the file that is gone: it is missing, not replaced
            raise FileNotFoundError(f"melo_fast: {weights} is missing (named by {path / CONFIG_FILE})")
        weights = named
        checksums = meta.get(CHECKSUMS)
        if checksums is not None:
            _check_sha256(path / CONFIG_FILE, _config_digest(meta), _recorded(checksums, CONFIG_FILE))
        try:
            if checksums is not None:
                # Files are never rewritten under their name (each save writes a new one), so the bytes
                # hashed here are the ones loaded next.
                _check_sha256(weights, files.sha256_of(weights), _recorded(checksums, weights.name))
            tensors = load_file(str(weights))
            break
        except FileNotFoundError:
            continue  # a concurrent save replaced the config and deleted this file since we read the config
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise ValueError(
                f"melo_fast: {weights} is not a readable safetensors file (truncated or corrupt?): {err}"
            ) from err
    else:
        raise FileNotFoundError(
            f"melo_fast: {path} was replaced by another save each of the {READ_TRIES} times it was read "
            "(saves to it in a loop?); read it again once they pause"
        )
    try:
        return _parse(meta, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"melo_fast: {path} is not a consistent melo_fast save: {err}") from err


def _recorded(checksums, name: str):
    return checksums.get(name) if isinstance(checksums, dict) else None


def _read_meta(path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"melo_fast: no save folder at {path}")
    if not config_file.is_file():
        raise FileNotFoundError(f"melo_fast: {path} is not a melo_fast save folder ({CONFIG_FILE} is missing)")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"melo_fast: {config_file} is corrupt (not JSON): {err}") from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"melo_fast: {config_file} has save format version {version!r}; this melo_fast reads {READABLE_VERSIONS}"
        )
    return meta


def _parse(meta: dict, tensors: dict[str, torch.Tensor]) -> SavedEdits:
    config = MeloConfig.from_dict(meta["config"])
    num_blocks = int(meta["num_blocks"])
    blocks = {}
    for name in config.targets:
        A, B = tensors.get(f"lora.{name}.A"), tensors.get(f"lora.{name}.B")
        if A is None or B is None:
            raise ValueError(f"the blocks of target {name!r} are missing")
        expected = (num_blocks, config.rank_per_block)
        if A.dim() != 3 or B.dim() != 3 or A.shape[:2] != expected or B.shape[:2] != expected:
            raise ValueError(
                f"the blocks of {name!r} have shapes {tuple(A.shape)}/{tuple(B.shape)}, expected "
                f"[{num_blocks}, {config.rank_per_block}, d]"
            )
        blocks[name] = (A, B)
    db_tensors = {name[len("db.") :]: t for name, t in tensors.items() if name.startswith("db.")}
    database = VectorDatabase.from_state_dict(db_tensors, meta["database"], device="cpu")
    fingerprint = Fingerprint.from_save(tensors, meta["model_fingerprint"]) if "model_fingerprint" in meta else None
    projection = None
    if PROJECTION in meta:
        prefix = f"{PROJECTION}."
        projection = KeyProjection.from_data(
            {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}, meta[PROJECTION]
        )
    return SavedEdits(config, num_blocks, blocks, database, fingerprint, meta, projection)
