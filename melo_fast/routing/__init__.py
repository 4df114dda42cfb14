"""The serving side: which block each input uses, decided once per forward call and applied by hooks.

Data flows one way: the entry hook opens the call (``entry.py``) → the router hook turns the router's
output into keys (``keys.py``; through the state's key projection, ``key_projection.py``, if it has one)
and searches the published edit state's database (``router.py``) → every
target hook adds its block's LoRA for the routed samples (``lora.py``). ``calls.py`` holds the per-model,
per-thread routing of a call; ``state.py`` the immutable :class:`EditState` that commits publish. Nothing
here imports the editing side.
"""

from melo_fast.routing.calls import Call, KeysCaptured, RefusesCopy, Routing
from melo_fast.routing.entry import EntryHook, GenerateWrapper
from melo_fast.routing.keys import extract_keys
from melo_fast.routing.lora import BlockLoRAHook
from melo_fast.routing.router import RouterHook
from melo_fast.routing.state import EditState

__all__ = [
    "BlockLoRAHook",
    "Call",
    "EditState",
    "EntryHook",
    "GenerateWrapper",
    "KeysCaptured",
    "RefusesCopy",
    "RouterHook",
    "Routing",
    "extract_keys",
]
