"""Loading a local Hugging Face model folder for ``python -m melo_fast eval`` (offline)."""

from __future__ import annotations

import os
from pathlib import Path


def load_local_model(path: str):
    """``(model, tokenizer)`` from a local Hugging Face folder: seq2seq, classifier or causal LM by config."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path}: not a folder (give a local Hugging Face model folder)")
    config = AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    if config.is_encoder_decoder:
        auto = AutoModelForSeq2SeqLM
    elif any(a.endswith("ForSequenceClassification") for a in architectures):
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    model = auto.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
