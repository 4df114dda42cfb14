"""``from melo_fast.editor import build_edit_batch``: the public import path the README shows; the editor
itself is ``melo_fast.editing``."""

from melo_fast.editing import EditResult, MeloEditor, build_edit_batch

__all__ = ["EditResult", "MeloEditor", "build_edit_batch"]
