"""Generic module traversal: find the router and targets by name, attach MELO's layers, and undo it.

Works on any model built of ``nn.Linear`` / HF ``Conv1D``: names come from ``MeloConfig`` or, when
left out, from ``melo_fast.targets``. A PEFT model (``PeftModel``) is patched through its base
model, and a router or target that PEFT already wrapped is resolved to the layer PEFT wraps.
:func:`load` is :func:`patch` plus the saved edit state.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
from torch import nn

from melo_fast import checkpoint
from melo_fast.config import MeloConfig
from melo_fast.editor import MeloEditor
from melo_fast.layers import SUPPORTED_TYPES, BlockLoRALinear, RouterLayer, linear_shape
from melo_fast.routing import Routing
from melo_fast.state import EditState
from melo_fast.targets import NoDefaultModules, choose_modules
from melo_fast.vecdb import VectorDatabase

EDITOR_ATTRIBUTE = "_melo_editor"


def supported_module_names(model: nn.Module) -> list[str]:
    """Names of every module MELO can use as router or target (``nn.Linear`` / ``Conv1D``)."""
    return [name for name, module in model.named_modules() if isinstance(module, SUPPORTED_TYPES)]


def _candidates_hint(model: nn.Module, limit: int = 12) -> str:
    names = supported_module_names(model)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    return f"candidate nn.Linear/Conv1D modules: {shown or 'none'}"


def find_module(model: nn.Module, name: str, role: str) -> tuple[str, nn.Module]:
    """The one module whose full name is ``name`` or ends with ``.name``; it must be Linear/Conv1D."""
    modules = dict(model.named_modules())
    if name in modules:
        matches = [name]
    else:
        matches = [full for full in modules if full.endswith("." + name)]
    if not matches:
        raise ValueError(
            f"melo_fast: {role} module {name!r} does not exist in {type(model).__name__}; {_candidates_hint(model)}"
        )
    if len(matches) > 1:
        raise ValueError(
            f"melo_fast: {role} module name {name!r} is ambiguous, it matches {matches}; give the full name"
        )
    module = modules[matches[0]]
    name = matches[0]
    wrapped = getattr(module, "base_layer", None)  # PEFT's tuner layers keep the original as `base_layer`
    if isinstance(wrapped, nn.Module) and not isinstance(module, SUPPORTED_TYPES):
        if not isinstance(wrapped, SUPPORTED_TYPES):
            raise TypeError(
                f"melo_fast: {role} module {name!r} is a {type(module).__module__}.{type(module).__name__} "
                f"wrapping a {type(wrapped).__name__}, not nn.Linear or Conv1D; {_candidates_hint(model)}"
            )
        return name + ".base_layer", wrapped
    if not isinstance(module, SUPPORTED_TYPES):
        raise TypeError(
            f"melo_fast: {role} module {name!r} is a {type(module).__module__}.{type(module).__name__}, "
            f"not nn.Linear or Conv1D; {_candidates_hint(model)}"
        )
    return name, module


def default_names(model: nn.Module) -> tuple[str, list[str]]:
    """Default (router, targets) of ``model``, found from its structure (rule: ``melo_fast.targets``)."""
    try:
        choice = choose_modules(model)
    except NoDefaultModules as err:
        raise ValueError(f"{err}; pass MeloConfig(router=..., targets=[...]). {_candidates_hint(model)}") from None
    return choice.router, list(choice.targets)


def _entry_hook(model: nn.Module, routing: Routing, router_in_encoder: bool, causal_lm: bool):
    """Forward pre-hook that starts a call's routing (attention mask, prompt end, stickiness)."""
    signature = inspect.signature(model.forward)
    # The padding check reads a tensor on the host: free on CPU, but a device synchronization on a GPU,
    # so there it runs on the first batched call without an attention mask only, not on every request.
    # On CPU it runs until it warns (once).
    padding_checked = []

    def hook(module, args, kwargs):
        try:
            arguments = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            arguments = dict(kwargs)
        arguments.update(arguments.pop("kwargs", {}) or {})
        mask = arguments.get("attention_mask")
        input_ids = arguments.get("input_ids")
        past = arguments.get("past_key_values")
        past_length = 0
        if past is not None and hasattr(past, "get_seq_length"):
            past_length = past.get_seq_length()
        elif isinstance(past, (tuple, list)) and past and past[0] is not None:
            past_length = past[0][0].shape[-2]
        continues = past_length > 0 or (router_in_encoder and arguments.get("encoder_outputs") is not None)

        prompt_end = None
        labels = arguments.get("labels")
        if causal_lm and labels is not None and input_ids is not None and labels.shape == input_ids.shape:
            supervised = labels != -100
            t = labels.shape[1]
            first = supervised.int().argmax(dim=1)  # first supervised token (argmax keeps the first max)
            # No prompt part (no labels, or a plain LM loss from token 0): the whole sequence gives the key.
            prompt_end = torch.where(supervised.any(dim=1) & (first > 0), first, t)

        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        batched_without_mask = mask is None and input_ids is not None and input_ids.shape[0] > 1 and not continues
        if batched_without_mask and not padding_checked and pad_token_id is not None:
            padded = bool((input_ids == pad_token_id).any())
            if padded or input_ids.device.type != "cpu":
                padding_checked.append(True)
            if padded:
                warnings.warn(
                    "melo_fast: input_ids contain padding but no attention_mask was passed; keys are taken as if "
                    "every token were real. Pass attention_mask so each key comes from the last real token.",
                    stacklevel=3,
                )
        sized = (input_ids, arguments.get("inputs_embeds"), mask)
        batch_size = next((v.shape[0] for v in sized if v is not None), None)
        routing.start_call(batch_size, mask, prompt_end, continues)
        return None

    return hook


class _GenerateWrapper:
    """Instance-level ``model.generate`` that routes once per generation; ``remove()`` undoes it."""

    def __init__(self, model: nn.Module, routing: Routing):
        self.model, self.routing = model, routing
        self.generate = model.generate
        functools.update_wrapper(self, self.generate)

    def __call__(self, *args, **kwargs):
        with self.routing.generation():
            return self.generate(*args, **kwargs)

    def remove(self) -> None:
        del self.model.generate


def _wrap_generate(model: nn.Module, routing: Routing) -> _GenerateWrapper:
    wrapper = _GenerateWrapper(model, routing)
    model.generate = wrapper
    return wrapper


def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a wrapper whose ``generate`` calls it directly (PEFT's ``PeftModel``)."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base_model) else model


def patch(model: nn.Module, config: MeloConfig | None = None, tokenizer=None) -> MeloEditor:
    """Attach MELO to ``model`` in place and return its editor.

    Args:
        model: a Hugging Face (or any) model whose router and targets are ``nn.Linear``/``Conv1D``;
            a PEFT ``PeftModel`` works too.
        config: what to patch and how; None uses the defaults for the model (``melo_fast.targets``).
        tokenizer: the model's tokenizer, used once to measure the key scale when
            ``config.init_radius="auto"`` (the default); ``edit_texts`` and ``calibrate`` also take it.

    Returns:
        The :class:`MeloEditor` of this model (also reachable as ``model._melo_editor``).

    Raises:
        RuntimeError: the model is already patched.
        ValueError: a bad config, a module name that does not exist or is ambiguous (the message lists
            candidates), or no default router/targets for this model's structure.
        TypeError: a router or target that is not ``nn.Linear``/``Conv1D``, or a target with quantized
            weights.
    """
    if getattr(model, EDITOR_ATTRIBUTE, None) is not None:
        raise RuntimeError(
            "melo_fast: this model is already patched; use its editor "
            "(model._melo_editor) or call melo_fast.unpatch(model) first"
        )
    config = MeloConfig() if config is None else config
    config.validate()
    inner = _base_model(model)
    if config.router is None or config.targets is None:
        default_router, default_targets = default_names(inner)
        config = config.replace(router=config.router or default_router, targets=config.targets or default_targets)

    router_name, router_module = find_module(model, config.router, "router")
    targets = [find_module(model, name, "target") for name in config.targets]
    if len({name for name, _ in targets}) != len(targets):
        raise ValueError(f"melo_fast: targets {config.targets} name the same module more than once")
    for name, module in targets:
        if not module.weight.dtype.is_floating_point:
            # The blocks are stored in the target weight's dtype and added to its output; a quantized
            # weight (bitsandbytes int8/4-bit) has neither a float dtype to store them in nor a plain W.
            raise TypeError(
                f"melo_fast: target module {name!r} has {module.weight.dtype} (quantized) weights; targets need "
                "float weights. Keep the targets unquantized (e.g. BitsAndBytesConfig(llm_int8_skip_modules=[...] "
                "naming them)) or choose other targets (MeloConfig.targets)"
            )
    config = config.replace(router=router_name, targets=[name for name, _ in targets])

    radius = config.radius_policy.absolute  # resolved here, or measured before the first edit (None)
    database = VectorDatabase(linear_shape(router_module)[1], radius, device=router_module.weight.device)
    routing = Routing(EditState(database, {name: () for name, _ in targets}, 0))
    router = RouterLayer(router_name, routing, config.key_position, config.backend)
    lora_layers = {
        name: BlockLoRALinear(name, module, routing, config.rank_per_block, config.scale, config.backend)
        for name, module in targets
    }

    config_of_model = getattr(inner, "config", None)
    is_encoder_decoder = bool(getattr(config_of_model, "is_encoder_decoder", False))
    encoder = inner.get_encoder() if is_encoder_decoder and hasattr(inner, "get_encoder") else None
    router_in_encoder = encoder is not None and any(module is router_module for module in encoder.modules())
    can_generate = hasattr(inner, "can_generate") and inner.can_generate()
    causal_lm = can_generate and not is_encoder_decoder

    # Hooks run in registration order: the router's is registered first so that, if the router
    # module is also a target, the keys come from its unedited output.
    handles = [router_module.register_forward_hook(router.hook)]
    router_module.melo_router = router
    for name, module in targets:
        module.melo_lora = lora_layers[name]
        handles.append(module.register_forward_hook(lora_layers[name].hook))
    # Entry hooks and the generate wrapper go on the inner model: a wrapper's generate() (PEFT's)
    # calls the inner model's forward directly, so a hook on the wrapper would miss every step.
    entry_points = [inner] + ([encoder] if encoder is not None else [])
    for entry in entry_points:
        hook = _entry_hook(entry, routing, router_in_encoder, causal_lm and entry is inner)
        handles.append(entry.register_forward_pre_hook(hook, with_kwargs=True))

    if can_generate:
        handles.append(_wrap_generate(inner, routing))

    editor = MeloEditor(
        model, config, routing, router, lora_layers, handles, causal_lm=causal_lm, seq2seq=is_encoder_decoder,
        tokenizer=tokenizer,
    )
    setattr(model, EDITOR_ATTRIBUTE, editor)
    if router_module.weight.device.type == "cuda":
        editor.warmup()  # compile the Triton kernels now, not on the first request
    return editor


def unpatch(model: nn.Module) -> nn.Module:
    """Remove everything :func:`patch` attached; the model is then exactly as before patching.

    A block this thread opened is aborted first.

    Raises:
        RuntimeError: the model is not patched, or another thread has a block open (it may be training
            it right now: let it commit or abort first).
    """
    editor = getattr(model, EDITOR_ATTRIBUTE, None)
    if editor is None:
        raise RuntimeError("melo_fast: this model is not patched")
    with editor._lock:  # no edit can start between the check and the removal
        if editor.block_is_open:
            editor.abort()
        for handle in editor.handles:
            handle.remove()
        modules = dict(model.named_modules())
        del modules[editor.config.router].melo_router
        for name in editor.config.targets:
            del modules[name].melo_lora
        delattr(model, EDITOR_ATTRIBUTE)
    return model


def load(model: nn.Module, path, tokenizer=None) -> MeloEditor:
    """Patch ``model`` with the config saved in ``path`` and restore every block and the database.

    The save is read and checked before the model is touched; if it does not fit the model, the
    model is left unpatched. Returns the model's :class:`~melo_fast.MeloEditor`.

    Raises:
        FileNotFoundError: no melo_fast save at ``path``.
        ValueError: the save is corrupt, or does not fit this model (the message says what differs).
        RuntimeError / TypeError: as :func:`patch` (already patched; modules that do not fit).
    """
    saved = checkpoint.read(path)
    editor = patch(model, saved.config, tokenizer=tokenizer)
    try:
        editor.replace_state(saved.database, saved.blocks)
    except BaseException as err:
        unpatch(model)
        if isinstance(err, ValueError):
            raise ValueError(f"melo_fast: cannot load edits from {path}: {err}") from err
        raise
    return editor
