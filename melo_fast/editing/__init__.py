"""The editing side: a batch in, one trained block and its keys published as a new edit state out.

- ``editor.py``: :class:`MeloEditor`, the lifecycle of a block (open, commit, abort), ``edit``, routing
  queries, ``close``;
- ``persistence.py``: the editor's save, reload, replace_state and export (a mixin of :class:`MeloEditor`);
- ``result.py``: :class:`EditResult`, what one edit batch did;
- ``batch.py``: :class:`EditBatch`, an edit batch checked for the model, built from text, with its targets;
- ``block.py``: the open block (its keys, parameters, what opening it froze);
- ``training.py``: the training loop of one block (MELO's Adam + StepLR);
- ``continuation.py``, ``prefixed_rows.py``: the rows a block also trains on (the model's continuation after
  the target; the rows behind unrelated prefixes);
- ``calibration.py``: the key scale behind the default radius; texts as inputs for reading keys;
- ``key_projection_training.py``: ``train_key_projection``, a :class:`~melo_fast.KeyProjection` learned from
  facts in several wordings, its radius chosen on held-out folds;
- ``restore.py``: an edit state built elsewhere (a save), checked against the model before it is published.
"""

from melo_fast.editing.batch import EditBatch, build_edit_batch
from melo_fast.editing.editor import MeloEditor
from melo_fast.editing.result import EditResult

__all__ = ["EditBatch", "EditResult", "MeloEditor", "build_edit_batch"]
