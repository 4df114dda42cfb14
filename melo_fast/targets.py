"""Which modules ``patch()`` chooses, and why: the default router and LoRA targets, from structure.

No per-architecture table: the rule reads the model's structure, so it covers any Hugging Face
family built of transformer blocks (the README's "Which modules patch() chooses" says the same).

1. **Block stack.** The outermost ``nn.ModuleList`` of same-type blocks that hold projections
   (``nn.Linear`` / HF ``Conv1D``), whose length is the config's layer count. Encoder-decoders have
   two: the encoder's and the decoder's.
2. **MLP projections of a block.** Projections inside an attention module (a class named
   ``*Attention*``) or inside a mixture of experts are set aside. Of the rest, the MLP *output*
   projection maps back to the residual width (the most common input width in the block) from the
   widest input; the MLP *input* projection is the last one before it that maps the residual width to
   that intermediate width, or to twice it (fused gate+up, as phi3's ``gate_up_proj``).
   An MoE block (experts in a ``ModuleList`` or fused into 3-D parameters) offers only modules every
   token passes through: its shared expert's MLP if it has one, else the attention output projection.
3. **Which end of the MLP.** Decoder-only models (causal attention) use the MLP input projection, as
   MELO's GPT2-XL setting (``c_fc``); encoders and encoder-decoders the output projection, as its
   BERT (``output.dense``) and T5 (``wo``) settings.
4. **Depth** (:func:`default_layers`): router in block ``2n/3 - 1`` of ``n``, LoRA on the next two
   blocks; for encoder-decoders the router is in the encoder and the decoder's blocks at the same
   relative depth get LoRA too (MELO's zsRE/T5 setting).

:func:`choose_modules` returns the choice with the reasons (``python -m melo_fast inspect`` prints them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

SUPPORTED_TYPES = (nn.Linear, Conv1D)  # what can be a router or a target

# Config attributes that give a layer count (HF's attribute maps cover most aliases; these are the rest).
_LAYER_COUNT_FIELDS = (
    "num_hidden_layers", "num_layers", "num_decoder_layers", "encoder_layers", "decoder_layers", "n_layer", "n_layers"
)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or HF ``Conv1D`` (whose weight is stored ``[d_in, d_out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.nf


@dataclass(frozen=True)
class ModelKind:
    """What kind of model is patched; it decides an edit batch's labels and how keys are read.

    Attributes:
        causal_lm: a decoder-only model that generates: labels ``[N, T]`` with -100 on the prompt, and
            the key is read at the last prompt token.
        seq2seq: an encoder-decoder: labels ``[N, T_target]`` of decoder tokens.
        Neither: a classifier (labels ``[N]`` class ids).
    """

    causal_lm: bool
    seq2seq: bool

    @classmethod
    def of(cls, model: nn.Module) -> ModelKind:
        """The kind of a Hugging Face model (not a PEFT wrapper: pass its base model)."""
        seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        can_generate = hasattr(model, "can_generate") and model.can_generate()
        return cls(causal_lm=can_generate and not seq2seq, seq2seq=seq2seq)


class NoDefaultModules(ValueError):
    """The structure gives no router/targets (no block stack, or blocks without an MLP); says what was found."""


@dataclass(frozen=True)
class BlockStack:
    """A stack of transformer blocks: ``path`` is the ``ModuleList``'s name, ``role`` one of
    ``"decoder-only"``, ``"encoder-only"``, ``"encoder"``, ``"decoder"``."""

    path: str
    num_blocks: int
    role: str


@dataclass(frozen=True)
class ModuleChoice:
    """What :func:`choose_modules` picked.

    Attributes:
        router: full module name of the router.
        targets: full module names of the LoRA targets, in model order.
        stacks: the block stacks found (router stack first).
        router_block: index of the router's block in the first stack.
        key_width: width of one key (the router's output features).
        reasons: one line per decision, in the order they were taken.
    """

    router: str
    targets: tuple[str, ...]
    stacks: tuple[BlockStack, ...]
    router_block: int
    key_width: int
    reasons: tuple[str, ...]

    def describe(self) -> str:
        """Multi-line text: layer count, router, key width, targets and the reasons."""
        stacks = ", ".join(f"{s.path} ({s.num_blocks} layers, {s.role})" for s in self.stacks)
        lines = [
            f"layers:    {stacks}",
            f"router:    {self.router} (block {self.router_block})",
            f"key width: {self.key_width}",
            "targets:   " + "\n           ".join(self.targets),
            "why:",
        ]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def default_layers(num_layers: int) -> tuple[int, list[int]]:
    """Router layer and LoRA layers for a model of ``num_layers`` layers.

    Router at ``2n/3 - 1`` (4 of 8 for T5-small-ssm-nq, as in the paper), LoRA on the next two.
    """
    router = max(0, (2 * num_layers) // 3 - 1)
    lora = list(range(router + 1, min(router + 3, num_layers))) or [router]
    return router, lora


def choose_modules(model: nn.Module) -> ModuleChoice:
    """The default router and LoRA targets of ``model`` with the reasons; see the module docstring.

    Raises:
        NoDefaultModules: no block stack of projections, or a block without a usable MLP / attention
            output projection; the message says what was found.
    """
    config = getattr(model, "config", None)
    stacks, stack_reason = _find_stacks(model, config)
    causal, causal_reason = _is_causal(stacks[0][1][0], config)
    if len(stacks) == 1:
        stacks = [(stacks[0][0], stacks[0][1], "decoder-only" if causal else "encoder-only")]
    end = "input" if causal else "output"
    reasons = [
        stack_reason,
        f"{causal_reason}: "
        + (
            "decoder-only, so the MLP input projection (MELO's GPT2-XL setting: c_fc)"
            if causal
            else "encoder or encoder-decoder, so the MLP output projection (MELO's BERT and T5 settings: "
            "output.dense, wo)"
        ),
    ]

    (first_path, first_blocks, _), *other_stacks = stacks
    router_block, lora_blocks = default_layers(len(first_blocks))
    router_relative, why = _block_projection(first_blocks[router_block], end)
    router = f"{first_path}.{router_block}.{router_relative}"
    reasons.append(f"block {router_block} of {first_path}: {why}")
    targets = [_projection_name(first_path, first_blocks, i, end) for i in lora_blocks]
    reasons.append(
        f"depth: router in block {router_block} = max(0, 2*{len(first_blocks)}//3 - 1), "
        f"LoRA on the next blocks {lora_blocks} of {first_path}"
    )
    for path, blocks, _ in other_stacks:
        other_lora = default_layers(len(blocks))[1]
        targets += [_projection_name(path, blocks, i, end) for i in other_lora]
        reasons.append(f"same depth rule on {path} ({len(blocks)} blocks): LoRA on blocks {other_lora}")

    key_width = linear_shape(dict(model.named_modules())[router])[1]
    return ModuleChoice(
        router=router,
        targets=tuple(targets),
        stacks=tuple(BlockStack(path, len(blocks), role) for path, blocks, role in stacks),
        router_block=router_block,
        key_width=key_width,
        reasons=tuple(reasons),
    )


def _projections(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, SUPPORTED_TYPES)]


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList of same-type children, each holding at least two projections."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    child_type = type(module[0])
    return all(type(child) is child_type and len(_projections(child)) >= 2 for child in module)


def _layer_counts(config) -> set[int]:
    """Layer counts the config states (also of its text config, for multimodal models)."""
    if config is None:
        return set()
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    counts = set()
    for one in configs:
        for field in _LAYER_COUNT_FIELDS:
            value = getattr(one, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                counts.add(value)
    return counts


def named_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every outermost ``nn.ModuleList`` of same-type blocks holding projections, with its name, in model order.

    A list inside another one (a block's experts) is not a stack of its own.
    """
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if any(name.startswith(path + ".") for path, _ in found):
            continue
        if _is_block_list(module):
            found.append((name, module))
    return found


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The block stacks of :func:`named_block_lists`, without their names."""
    return [blocks for _, blocks in named_block_lists(model)]


def _find_stacks(model: nn.Module, config) -> tuple[list[tuple[str, nn.ModuleList, str]], str]:
    """``[(path, blocks, role)]`` with the router's stack first, and why these. The role of a single stack
    (decoder-only or encoder-only) is left empty: the caller tells it from the attention."""
    found = named_block_lists(model)
    if not found:
        raise NoDefaultModules(
            f"melo_fast: no default router/targets for {type(model).__name__}: it has no stack of transformer "
            "blocks (an nn.ModuleList of same-type blocks holding nn.Linear/Conv1D projections)"
        )
    counts = _layer_counts(config)
    matching = [(path, blocks) for path, blocks in found if len(blocks) in counts]
    if matching:
        length_reason = f"length = a layer count of the config {sorted(counts)}"
    else:
        matching, length_reason = found, "the config states no matching layer count"
    listing = ", ".join(f"{path} ({len(blocks)})" for path, blocks in matching)

    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        encoder = model.get_encoder()
        in_encoder = {id(m) for m in encoder.modules()}
        encoders = [(p, b) for p, b in matching if id(b) in in_encoder]
        decoders = [(p, b) for p, b in matching if id(b) not in in_encoder]
        if len(encoders) == 1 and len(decoders) == 1:
            stacks = [(*encoders[0], "encoder"), (*decoders[0], "decoder")]
            return stacks, f"block stacks {listing}: encoder and decoder ({length_reason})"
    elif len(matching) == 1:
        path, blocks = matching[0]
        return [(path, blocks, "")], f"block stack {listing} ({length_reason})"
    raise NoDefaultModules(
        f"melo_fast: no default router/targets for {type(model).__name__}: cannot tell which block stack to use "
        f"among {listing}"
    )


def _is_causal(block: nn.Module, config) -> tuple[bool, str]:
    """Whether the model is decoder-only (causal self-attention), and how that was decided."""
    if getattr(config, "is_encoder_decoder", False):
        return False, "encoder-decoder (config.is_encoder_decoder)"
    declared = [
        (type(m).__name__, m.is_causal)
        for m in block.modules()
        if isinstance(getattr(m, "is_causal", None), bool)
    ]
    if declared:
        causal = any(flag for _, flag in declared)
        name = next(n for n, flag in declared if flag == causal)
        return causal, f"{'causal' if causal else 'bidirectional'} attention ({name}.is_causal={causal})"
    # Attention that does not declare it (e.g. bloom): the HF registry tells decoder-only families apart.
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    registered = "has a causal-LM class and no masked-LM class" if causal else "is not a causal-LM-only type"
    return causal, f"attention does not declare is_causal; in the HF registry, model type {model_type!r} {registered}"


def _projection_name(path: str, blocks: nn.ModuleList, index: int, end: str) -> str:
    return f"{path}.{index}.{_block_projection(blocks[index], end)[0]}"


def _block_projection(block: nn.Module, end: str) -> tuple[str, str]:
    """``(name inside the block, why)`` of the block's MLP ``end`` ("input"/"output") projection."""
    projections = _projections(block)
    attention = [name for name, m in block.named_modules() if name and "Attention" in type(m).__name__]
    expert_lists = [name for name, m in block.named_modules() if name and _is_block_list(m)]
    fused_experts = sorted({name.rsplit(".", 1)[0] for name, p in block.named_parameters() if p.dim() >= 3})
    is_moe = bool(expert_lists or fused_experts)

    def inside(name: str, prefixes: list[str]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    shapes = {name: linear_shape(m) for name, m in projections}
    width = Counter(d_in for d_in, _ in shapes.values()).most_common(1)[0][0]  # the residual stream's width
    dense = [name for name, _ in projections if not inside(name, attention + expert_lists)]
    outputs = [name for name in dense if shapes[name][1] == width]
    if outputs:
        output = max(outputs, key=lambda name: shapes[name][0])  # max keeps the first of equals
        intermediate = shapes[output][0]
        before = dense[: dense.index(output)]
        inputs = [n for n in before if shapes[n][0] == width and shapes[n][1] in (intermediate, 2 * intermediate)]
        where = "shared expert's MLP" if is_moe else "MLP"
        if end == "output":
            return output, f"{where} output projection {output} ({intermediate} -> {width})"
        if inputs:
            chosen = inputs[-1]
            fused = " (fused: twice the intermediate width)" if shapes[chosen][1] == 2 * intermediate else ""
            return chosen, f"{where} input projection {chosen} ({width} -> {shapes[chosen][1]}){fused}"
    if is_moe:
        attention_outputs = [n for n, _ in projections if inside(n, attention) and shapes[n][1] == width]
        if attention_outputs:
            chosen = attention_outputs[-1]
            experts = ", ".join(expert_lists + fused_experts)
            return chosen, (
                f"mixture-of-experts block (experts: {experts}) without a shared expert: the attention output "
                f"projection {chosen}, which every token passes through"
            )
    raise NoDefaultModules(
        f"melo_fast: no default router/targets: block {type(block).__name__} has no MLP {end} projection "
        f"(projections: {', '.join(f'{n} {shapes[n][0]}->{shapes[n][1]}' for n, _ in projections)})"
    )
