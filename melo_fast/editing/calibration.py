"""The scale-free default radius: measure the model's key scale on neutral prompts.

An absolute radius (MELO's 0.5) means different things for a router whose keys have norm 0.1 and
one whose keys have norm 1000, and bf16 rounding at the larger scale alone exceeds it. With
``MeloConfig.init_radius="auto"`` (the default) the radius is instead

    init_radius = MeloConfig.relative_radius × key_scale,

where ``key_scale`` is the median distance between the keys of :data:`NEUTRAL_PROMPTS`, short
everyday sentences and questions about unrelated things, as this model and router see them. It is
measured once, before the first edit, and saved with the edits. Scaling the router's output scales
``key_scale`` and the radius with it, so routing does not change (DESIGN §2.12).

Why the median *pairwise* distance: it is the typical distance between two inputs that have nothing
to do with each other, and unlike a nearest-neighbour distance it does not shrink as the set grows.
Why a tenth of it (``relative_radius=0.1``): an edit's scope must hold the edited input under
numerical noise and light rewording, and keep out inputs that merely share its topic or template;
those sit much closer to each other than unrelated inputs do, so the radius is a small fraction of
the unrelated distance.
"""

from __future__ import annotations

import torch

NEUTRAL_PROMPTS = (
    "The weather today is mild with a light breeze.",
    "How many legs does a spider have?",
    "She poured a cup of tea and opened the window.",
    "What is the boiling point of water at sea level?",
    "The train to the coast leaves every hour.",
    "Who painted the ceiling of the old chapel?",
    "Bread rises because yeast produces gas.",
    "Which river flows through the largest city in the region?",
    "My neighbour repairs bicycles in his garage.",
    "In what year did the bridge open to traffic?",
    "A triangle has three sides and three angles.",
    "Where do migrating birds spend the winter?",
    "The library closes early on public holidays.",
    "What language is spoken in the mountain villages?",
    "He forgot his umbrella at the restaurant.",
    "How long does light take to travel from the sun to the earth?",
    "The orchestra tuned their instruments before the concert.",
    "Which planet has the most moons?",
    "Fresh snow covered the fields overnight.",
    "What is the main ingredient of hummus?",
    "The committee will publish its report next month.",
    "Who wrote the first dictionary of the language?",
    "Our team won the match in the final minute.",
    "What causes the tides of the ocean?",
    "The museum displays fossils of ancient fish.",
    "Which instrument has eighty-eight keys?",
    "Children learn to read at different speeds.",
    "What is the capital of the northern province?",
    "The software update fixed a memory leak.",
    "How do bees tell each other where the flowers are?",
    "A heavy storm delayed the harvest.",
    "Which mineral gives the rocks their green colour?",
)


def neutral_inputs(tokenizer, device) -> list[dict[str, torch.Tensor]]:
    """The :data:`NEUTRAL_PROMPTS` as model inputs on ``device`` (:func:`text_inputs`, one batch)."""
    return text_inputs(tokenizer, list(NEUTRAL_PROMPTS), device, batch_size=len(NEUTRAL_PROMPTS))


def text_inputs(tokenizer, texts: list[str], device, batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    """``texts`` as model inputs on ``device``, in their order, for reading their keys.

    Returns:
        A list of tokenizer outputs (``input_ids``, ``attention_mask``, ...: ``[B, T]`` int64 tensors):
        batches of up to ``batch_size`` texts, padded on the right, when the tokenizer has a pad token;
        else one unpadded ``[1, T]`` batch per text (GPT-2's tokenizer has no pad token), so the user's
        tokenizer is never modified.

    Right padding whatever the tokenizer's side: keys are read from the inputs as given, and a model with
    absolute positions reads a left-padded prompt at shifted positions; edits read theirs unpadded.
    """
    rows = [tokenizer(text) for text in texts]
    if tokenizer.pad_token_id is None:
        batches = [{name: torch.tensor([values]) for name, values in row.items()} for row in rows]
    else:
        fill = {"input_ids": tokenizer.pad_token_id}  # every other entry (attention_mask, token_type_ids) pads with 0
        batches = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            length = max(len(row["input_ids"]) for row in chunk)
            batches.append({
                name: torch.tensor([row[name] + [fill.get(name, 0)] * (length - len(row[name])) for row in chunk])
                for name in chunk[0]
            })
    return [{name: value.to(device) for name, value in batch.items()} for batch in batches]


def key_scale(keys: torch.Tensor) -> float:
    """The key scale: the median pairwise Euclidean distance between the rows of ``keys``.

    Args:
        keys: ``[N, d]`` keys, ``N >= 2``, of any floating dtype and device; measured in float32.

    Returns:
        The median of the ``N (N - 1) / 2`` distances (``torch.pdist``) as a Python float. With an
        even number of distances it is the lower of the two middle ones (``torch.median``), not
        their mean.

    Raises:
        ValueError: ``keys`` is not ``[N, d]`` with ``N >= 2``, or the median is not a positive finite
            number (0: the router does not tell the prompts apart; inf or NaN: the keys overflowed or
            are not finite).
    """
    if keys.dim() != 2 or keys.shape[0] < 2:
        raise ValueError(f"melo_fast: key_scale needs [N, d] keys with N >= 2, got shape {tuple(keys.shape)}")
    scale = torch.pdist(keys.float()).median().item()
    if not scale > 0 or scale == float("inf"):
        raise ValueError(
            f"melo_fast: the neutral prompts' keys have median distance {scale}: the router's output does not "
            "tell inputs apart (or overflowed). Choose another router, or set an absolute MeloConfig.init_radius."
        )
    return scale


def local_tokenizer(model):
    """The tokenizer saved beside a model loaded from a local folder, or None (never downloads)."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer there: the caller says what to do
        return None
