"""Generic module traversal: find the router and targets by name, attach MELO's layers, and undo it.

Works on any model built of ``nn.Linear`` / HF ``Conv1D``: names come from ``MeloConfig`` or, when
left out, from ``melo_fast.targets``. A PEFT model (``PeftModel``) is patched through its base
model, and a router or target that PEFT already wrapped is resolved to the layer PEFT wraps.
:func:`load` is :func:`patch` plus the saved edit state.
"""

from __future__ import annotations

from torch import nn

from melo_fast.config import MeloConfig
from melo_fast.editing import MeloEditor
from melo_fast.io import checkpoint
from melo_fast.ops import registry
from melo_fast.routing import BlockLoRAHook, EditState, EntryHook, GenerateWrapper, RouterHook, Routing
from melo_fast.routing.keys import LeftPaddingCheck
from melo_fast.targets import SUPPORTED_TYPES, ModelKind, NoDefaultModules, choose_modules, linear_shape
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


class _Attachments:
    """What :func:`patch` attached to a model, and how to take all of it off again (``MeloEditor.close``)."""

    def __init__(self):
        self.handles = []  # hook handles and the generate wrapper: each has remove()
        self.attributes: list[tuple[object, str]] = []  # melo_router, melo_lora, the model's editor

    def set(self, owner, name: str, value) -> None:
        setattr(owner, name, value)
        self.attributes.append((owner, name))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for owner, name in self.attributes:
            delattr(owner, name)


def _base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a wrapper whose ``generate`` calls it directly (PEFT's ``PeftModel``)."""
    get_base_model = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if callable(get_base_model) else model


def patch(model: nn.Module, config: MeloConfig | None = None, tokenizer=None, key_projection=None) -> MeloEditor:
    """Attach MELO to ``model`` in place and return its editor.

    Args:
        model: a Hugging Face (or any) model whose router and targets are ``nn.Linear``/``Conv1D``;
            a PEFT ``PeftModel`` works too.
        config: what to patch and how; None uses the defaults for the model (``melo_fast.targets``).
        tokenizer: the model's tokenizer, used once to measure the key scale when
            ``config.init_radius="auto"`` (the default); ``edit_texts`` and ``calibrate`` also take it.
        key_projection: a :class:`~melo_fast.KeyProjection` trained for this router and key position
            (``melo_fast.train_key_projection``): inputs are routed by their projected keys, so an edit
            also reaches other wordings of its question (``MeloEditor.use_key_projection``). None: MELO's
            raw router keys.

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
    key_width = linear_shape(router_module)[1]
    database = VectorDatabase(key_width, radius, device=router_module.weight.device,
                              conflict_rule=config.radius_policy.conflict_rule_for(None))
    routing = Routing(EditState(database, {name: () for name, _ in targets}, 0))
    router = RouterHook(router_name, routing, config.key_position, config.backend, key_width)
    lora_layers = {
        name: BlockLoRAHook(name, module, routing, config.rank_per_block, config.scale, config.backend)
        for name, module in targets
    }

    kind = ModelKind.of(inner)
    encoder = inner.get_encoder() if kind.seq2seq and hasattr(inner, "get_encoder") else None
    router_in_encoder = encoder is not None and any(module is router_module for module in encoder.modules())
    can_generate = hasattr(inner, "can_generate") and inner.can_generate()

    left_padding = LeftPaddingCheck(inner)
    attached = _Attachments()
    # Hooks run in registration order: the router's is registered first so that, if the router
    # module is also a target, the keys come from its unedited output.
    attached.handles.append(router_module.register_forward_hook(router.hook))
    attached.set(router_module, "melo_router", router)
    for name, module in targets:
        attached.set(module, "melo_lora", lora_layers[name])
        attached.handles.append(module.register_forward_hook(lora_layers[name].hook))
    # Entry hooks and the generate wrapper go on the inner model: a wrapper's generate() (PEFT's)
    # calls the inner model's forward directly, so a hook on the wrapper would miss every step.
    for entry in [inner] + ([encoder] if encoder is not None else []):
        hook = EntryHook(entry, routing, router_in_encoder, kind.causal_lm and entry is inner, left_padding)
        attached.handles.append(entry.register_forward_pre_hook(hook, with_kwargs=True))
    if can_generate:
        attached.handles.append(GenerateWrapper(inner, routing))

    editor = MeloEditor(model, config, routing, router, lora_layers, kind, attached.remove, tokenizer=tokenizer)
    if key_projection is not None:
        try:
            editor.use_key_projection(key_projection)
        except BaseException:
            attached.remove()  # a projection that does not fit leaves the model unpatched
            raise
    attached.set(model, EDITOR_ATTRIBUTE, editor)
    _resolve_backends(config.backend, {router_module.weight.device} | {m.weight.device for _, m in targets})
    if router_module.weight.device.type == "cuda":
        editor.warmup()  # compile the Triton kernels now, not on the first request
    return editor


def _resolve_backends(backend: str | None, devices: set) -> None:
    """Resolve the op backend for every device the model runs on, now: a model that torch.compile
    traces before any eager call finds it resolved (tracing cannot load a backend). A backend that
    cannot run here says so at its first op, as it would without this."""
    for device in devices:
        try:
            registry.resolve(backend, device)
        except ImportError:
            pass


def unpatch(model: nn.Module) -> nn.Module:
    """Remove everything :func:`patch` attached; the model is then exactly as before patching.

    A block this thread opened is aborted first (``MeloEditor.close``).

    Raises:
        RuntimeError: the model is not patched, or another thread has a block open (it may be training
            it right now: let it commit or abort first).
    """
    editor = getattr(model, EDITOR_ATTRIBUTE, None)
    if editor is None:
        raise RuntimeError("melo_fast: this model is not patched")
    editor.close()
    return model


def load(model: nn.Module, path, tokenizer=None, check_model: bool = True) -> MeloEditor:
    """Patch ``model`` with the config saved in ``path`` and restore every block and the database.

    The save is read and checked (its checksums) before the model is touched; if it does not fit the
    model, the model is left unpatched. Returns the model's :class:`~melo_fast.MeloEditor`.

    Args:
        check_model: refuse a save made on a model with other weights (the fingerprint a save records,
            ``melo_fast.io.fingerprint``; a copy of the same weights in another dtype or on another
            device passes). False skips that comparison, for a model whose weights you changed on purpose.

    Raises:
        FileNotFoundError: no melo_fast save at ``path``.
        ValueError: the save is corrupt, or does not fit this model, or was made on another model (the
            message says what differs).
        RuntimeError / TypeError: as :func:`patch` (already patched; modules that do not fit).
    """
    saved = checkpoint.read(path)
    editor = patch(model, saved.config, tokenizer=tokenizer)
    try:
        editor.restore(saved, path, check_model)
    except BaseException as err:
        unpatch(model)
        if isinstance(err, ValueError):
            raise ValueError(f"melo_fast: cannot load edits from {path}: {err}") from err
        raise
    return editor
