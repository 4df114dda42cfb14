"""Tiny randomly initialised models of each supported family, with the real tokenizers.

No hub access on test machines: configs are built here (T5 from the real t5-small config, shrunk)
and tokenizers come from ../shared/assets/tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    T5ForConditionalGeneration,
)

from tests.conftest import TOKENIZERS

NUM_CLASSES = 6
# BERT's default init (0.02) makes a tiny random encoder map every sentence to nearly the same
# vector, so no edit could tell two sentences apart; a wider init gives distinguishable inputs.
INIT_RANGE = 0.2


@dataclass
class Family:
    name: str
    kind: str  # "causal", "seq2seq" or "classifier"
    model: torch.nn.Module
    tokenizer: object


def _gpt2_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _bert_tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZERS / "bert-base-uncased"))


def build(name: str, seed: int = 0) -> Family:
    """A fresh tiny model of family ``name`` (same seed → same weights), in eval mode."""
    torch.manual_seed(seed)
    if name == "gpt2":
        tok = _gpt2_tokenizer()
        config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=128,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        return Family(name, "causal", GPT2LMHeadModel(config).eval(), tok)
    if name == "llama":
        tok = _gpt2_tokenizer()
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
        return Family(name, "causal", LlamaForCausalLM(config).eval(), tok)
    if name == "opt":
        tok = _gpt2_tokenizer()
        config = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                           word_embed_proj_dim=64, vocab_size=len(tok), max_position_embeddings=128,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id)
        return Family(name, "causal", OPTForCausalLM(config).eval(), tok)
    if name == "t5":
        tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "t5-small"))
        config = AutoConfig.from_pretrained(str(TOKENIZERS / "t5-small"))
        config.update(dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=4))
        return Family(name, "seq2seq", T5ForConditionalGeneration(config).eval(), tok)
    if name == "bert":
        tok = _bert_tokenizer()
        config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            vocab_size=tok.vocab_size, num_labels=NUM_CLASSES, initializer_range=INIT_RANGE)
        return Family(name, "classifier", BertForSequenceClassification(config).eval(), tok)
    if name == "distilbert":
        tok = _bert_tokenizer()
        config = DistilBertConfig(dim=64, hidden_dim=128, n_layers=4, n_heads=4, vocab_size=tok.vocab_size,
                                  num_labels=NUM_CLASSES, initializer_range=INIT_RANGE)
        return Family(name, "classifier", DistilBertForSequenceClassification(config).eval(), tok)
    raise ValueError(name)


FAMILIES = ["gpt2", "llama", "opt", "t5", "bert", "distilbert"]


def block_tensors(editor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every target's committed blocks (``editor.blocks()`` may return views)."""
    return {name: (A.clone(), B.clone()) for name, (A, B) in editor.blocks().items()}
