"""Helpers of the writers that must never lose data (a save, ``checkpoint.py``; a PEFT export, ``export.py``):
refuse a destination that holds someone else's data, make what was written durable before it is
published by a rename, and checksum it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_READ_CHUNK = 2**20


def refuse_foreign_destination(path: Path, marker: str, kind: str, verb: str) -> bool:
    """Refuse a destination where writing a ``kind`` folder could destroy someone else's data.

    Shared by every writer that must never be destructive (a save, ``checkpoint.py``; a PEFT export,
    ``export.py``). ``path`` may be new, an empty folder, or a folder holding the file
    ``marker`` (an earlier ``kind``, which the caller may replace). Anything else (a file, a non-empty
    folder without ``marker``) raises FileExistsError, naming ``verb`` and the folder's entries;
    nothing is changed. Returns whether ``path`` holds ``marker``.
    """
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"melo_fast: cannot {verb} to {path}: it is a file. A {kind} is a folder; choose a new or empty "
            f"folder, or an earlier {kind} folder to replace it"
        )
    if not path.is_dir():
        return False
    if (path / marker).is_file():
        return True
    entries = sorted(p.name for p in path.iterdir())
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"melo_fast: cannot {verb} to {path}: the folder is not empty ({shown}) and is not a {kind} "
            f"(no {marker}). Choose a new or empty folder; nothing was changed"
        )
    return False


def fsync_file(path: Path) -> None:
    """Make a file's contents durable."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's contents, hex; read in 1 MiB pieces, so memory stays flat for any size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_READ_CHUNK):
            digest.update(piece)
    return digest.hexdigest()


def fsync_folder(path: Path) -> None:
    """Make a folder's entries (new, renamed, removed files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the data files are already synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
