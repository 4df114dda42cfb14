"""melo_fast: fast MELO model editing (neuron-indexed dynamic LoRA) for Hugging Face models.

import melo_fast
editor = melo_fast.patch(model, tokenizer=tokenizer)   # router and targets from the model's structure
editor.edit(batch)                                     # one edit batch -> one new LoRA block
editor.edit_texts(["The capital of France is"], ["Paris"], tokenizer)  # the same, from text
editor.save("edits/"); melo_fast.load(fresh_model, "edits/")
melo_fast.unpatch(model)

The tokenizer is needed once, to measure the model's key scale for the default radius
(``MeloConfig(init_radius="auto")``) before the first edit; ``edit_texts`` also takes it, and a model
loaded from a local folder finds its own. With an absolute ``MeloConfig(init_radius=...)`` none is needed.
"""

from melo_fast.config import MeloConfig
from melo_fast.editing import EditResult, MeloEditor
from melo_fast.editing.key_projection_training import Fact, train_key_projection
from melo_fast.patching import load, patch, unpatch
from melo_fast.routing.key_projection import KeyProjection
from melo_fast.version import __version__

__all__ = [
    "EditResult",
    "Fact",
    "KeyProjection",
    "MeloConfig",
    "MeloEditor",
    "__version__",
    "load",
    "patch",
    "train_key_projection",
    "unpatch",
]
