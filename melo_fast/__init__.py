"""melo_fast: fast MELO model editing (neuron-indexed dynamic LoRA) for Hugging Face models.

import melo_fast
editor = melo_fast.patch(model)        # router and targets found from the model's structure
editor.edit(batch)                     # one edit batch -> one new LoRA block
editor.save("edits/"); melo_fast.load(fresh_model, "edits/")
melo_fast.unpatch(model)
"""

from melo_fast.config import MeloConfig
from melo_fast.editor import EditResult, MeloEditor
from melo_fast.patching import load, patch, unpatch
from melo_fast.version import __version__

__all__ = ["EditResult", "MeloConfig", "MeloEditor", "__version__", "load", "patch", "unpatch"]
