"""Prototype key functions for the router, used by the end-to-end runs (``e2e.py``): route an editor
through a trained key projection (``projection.py``) of its router's keys, or by MiniLM's projected keys of
the prompt's text whatever model is edited. Each swaps the router hook's key function before any edit.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluation.generality import common  # noqa: E402
from melo_fast.vecdb import VectorDatabase  # noqa: E402


def use_projection(editor, path: str) -> None:
    """Route through a trained projection: the router's keys become ``projection(keys)`` for editing,
    calibration and serving alike (prototype of a ``MeloConfig`` option)."""
    from evaluation.generality.projection import load_projection

    projection, spec = load_projection(path)
    original = editor.router._keys

    def keys(self, output, call):
        with torch.no_grad():
            return projection(original(output, call))

    _swap_keys(editor, keys, projection.weight.shape[0])


def _swap_keys(editor, keys, width: int) -> None:
    """Give the router another key function of width ``width`` (before any edit)."""
    from melo_fast.routing.state import EditState

    # The router hook (melo_fast.routing.RouterHook) reads every key through its _keys: editing, calibration,
    # editor.keys and serving alike.
    editor.router._keys = types.MethodType(keys, editor.router)
    # The database holds keys of the new width: start it empty at that width (no edit yet).
    state = editor.routing.published
    if len(state.database):
        raise RuntimeError("the editor already holds edits keyed by another key function")
    database = VectorDatabase(width, None, device=state.database.device)
    editor.routing.published = EditState(database, state.blocks, state.num_blocks)


def use_text_keys(editor, tokenizer, projection_path: str) -> None:
    """Route by the prompt's *text*: MiniLM's key of it (the demo router, last token) through MiniLM's
    projection, whatever model is edited (prototype of an external key encoder).

    The router hook sees hidden states, not text: a forward pre-hook keeps the call's ``input_ids``, and
    the key function decodes each row's real prompt tokens (attention mask, before the edit target)
    back to text with the edited model's tokenizer.
    """
    import threading

    from evaluation.generality.projection import load_projection
    from melo_fast.eval.classifier import load_minilm
    from melo_fast.routing.keys import extract_keys

    projection, spec = load_projection(projection_path)
    module, layer, position = common.parse_spec(spec)
    encoder, encoder_tokenizer = load_minilm()
    router_module = dict(encoder.named_modules())[common.MODULES["minilm"][module].format(L=layer)]
    local = threading.local()

    def keep_ids(module, args, kwargs):
        local.input_ids = kwargs.get("input_ids", args[0] if args else None)

    editor.model.register_forward_pre_hook(keep_ids, with_kwargs=True)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        captured = {}
        handle = router_module.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
        try:
            inputs = encoder_tokenizer(texts, padding=True, return_tensors="pt")
            encoder(**inputs)
        finally:
            handle.remove()
        return projection(extract_keys(captured["out"], inputs["attention_mask"], None, position))

    def keys(self, output, call):
        ids = local.input_ids
        n, t = ids.shape
        real = torch.ones(n, t, dtype=torch.bool) if call.attention_mask is None else call.attention_mask.bool()
        if call.prompt_end is not None:
            real = real & (torch.arange(t)[None, :] < call.prompt_end[:, None])
        texts = [tokenizer.decode(ids[i][real[i]], skip_special_tokens=True).strip() for i in range(n)]
        return encode(texts)

    _swap_keys(editor, keys, projection.weight.shape[0])
