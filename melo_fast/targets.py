"""Data only: per-architecture default router and LoRA target modules.

Names are suffixes of module names (matched by ``patching.find_module``), so they work for the bare
model and for any head class (``BertModel`` and ``BertForSequenceClassification`` alike). ``{i}`` is a
layer index. The paper puts the router in a middle layer and the LoRA in the next layers (zsRE/T5:
router in encoder block 4 of 8, LoRA in blocks 5-6); ``default_layers`` applies that rule to any depth.
"""

from __future__ import annotations

# model_type -> (router pattern, target patterns)
DEFAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2": ("transformer.h.{i}.mlp.c_fc", ("transformer.h.{i}.mlp.c_fc",)),
    "gpt_neo": ("transformer.h.{i}.mlp.c_fc", ("transformer.h.{i}.mlp.c_fc",)),
    "gptj": ("transformer.h.{i}.mlp.fc_in", ("transformer.h.{i}.mlp.fc_in",)),
    "opt": ("decoder.layers.{i}.fc1", ("decoder.layers.{i}.fc1",)),
    "llama": ("layers.{i}.mlp.up_proj", ("layers.{i}.mlp.up_proj",)),
    "mistral": ("layers.{i}.mlp.up_proj", ("layers.{i}.mlp.up_proj",)),
    "qwen2": ("layers.{i}.mlp.up_proj", ("layers.{i}.mlp.up_proj",)),
    "t5": (
        "encoder.block.{i}.layer.1.DenseReluDense.wo",
        ("encoder.block.{i}.layer.1.DenseReluDense.wo", "decoder.block.{i}.layer.2.DenseReluDense.wo"),
    ),
    "bert": ("encoder.layer.{i}.output.dense", ("encoder.layer.{i}.output.dense",)),
    "roberta": ("encoder.layer.{i}.output.dense", ("encoder.layer.{i}.output.dense",)),
    "distilbert": ("transformer.layer.{i}.ffn.lin2", ("transformer.layer.{i}.ffn.lin2",)),
}


def default_layers(num_layers: int) -> tuple[int, list[int]]:
    """Router layer and LoRA layers for a model of ``num_layers`` layers.

    Router at ``2n/3 - 1`` (4 of 8 for T5-small-ssm-nq, as in the paper), LoRA on the next two.
    """
    router = max(0, (2 * num_layers) // 3 - 1)
    lora = list(range(router + 1, min(router + 3, num_layers))) or [router]
    return router, lora
