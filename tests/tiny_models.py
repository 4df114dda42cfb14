"""Tiny randomly initialised models of each supported family, with the real tokenizers.

No hub access on test machines: configs are built here (T5 from the real t5-small config, shrunk)
and tokenizers come from ../shared/assets/tokenizers. ``FAMILIES`` are the six the end-to-end suite
(test_families.py) runs in depth; ``ALL_FAMILIES`` every family the structural defaults are tested on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
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
# The decoder-only families beyond the first six use it too: at 0.02 a 64-wide random LM spreads its
# logits over ~2 across 50k tokens, so an edit wins by a fraction of a logit, and mixtral/qwen3_moe
# (LoRA on the small attention outputs) miss their target after 30 steps.
INIT_RANGE = 0.2
# BART (post-LN) between the two: at its default 0.02 the key (encoder, last token </s>) hardly depends on
# the words (two inputs of one length: 1% of the key norm apart, inside any radius), at 0.2 the tiny
# decoder saturates and an edit no longer reaches its target; 0.1 gives distinct keys and learnable edits.
BART_INIT_STD = 0.1


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
    if name in CAUSAL_CONFIGS:
        tok = _gpt2_tokenizer()
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        config = AutoConfig.for_model(_MODEL_TYPE.get(name, name), vocab_size=len(tok), initializer_range=INIT_RANGE,
                                      **ids, **CAUSAL_CONFIGS[name])
        return Family(name, "causal", AutoModelForCausalLM.from_config(config).eval(), tok)
    if name in CLASSIFIER_CONFIGS:
        tok = _bert_tokenizer()
        config = AutoConfig.for_model(name, vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id,
                                      num_labels=NUM_CLASSES, initializer_range=INIT_RANGE,
                                      **CLASSIFIER_CONFIGS[name])
        return Family(name, "classifier", AutoModelForSequenceClassification.from_config(config).eval(), tok)
    if name == "bart":
        # The T5 tokenizer (pad 0, </s> 1 appended to every text), with BART's ids set to match it.
        tok = AutoTokenizer.from_pretrained(str(TOKENIZERS / "t5-small"))
        config = AutoConfig.for_model(
            "bart", vocab_size=len(tok), d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=4,
            decoder_layers=4, encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=128,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id,
            decoder_start_token_id=tok.pad_token_id, forced_bos_token_id=None, forced_eos_token_id=None,
            init_std=BART_INIT_STD,
        )
        return Family(name, "seq2seq", AutoModelForSeq2SeqLM.from_config(config).eval(), tok)
    raise ValueError(name)


FAMILIES = ["gpt2", "llama", "opt", "t5", "bert", "distilbert"]

# Decoder-only families beyond the six above: config fields (besides vocabulary and special ids) of a
# 4-layer, 64-wide model. head_dim is set where the family's default (256) would dwarf the model.
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128)
_SMALL_HEADS = dict(_DECODER, head_dim=16)
CAUSAL_CONFIGS: dict[str, dict] = {
    "gpt_neo": dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, max_position_embeddings=128,
                    attention_types=[[["global", "local"], 2]], window_size=16),
    "gptj": dict(n_embd=64, n_layer=4, n_head=4, n_inner=128, rotary_dim=8, n_positions=128),
    "gpt_neox": dict(_DECODER, num_key_value_heads=None),
    "bloom": dict(hidden_size=64, n_layer=4, n_head=4),
    "falcon": dict(hidden_size=64, ffn_hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                   max_position_embeddings=128),
    "mistral": dict(_DECODER, sliding_window=None),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2": _DECODER,
    "qwen2_moe": dict(_DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "qwen3": _SMALL_HEADS,
    "qwen3_moe": dict(_SMALL_HEADS, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
    "gemma": _SMALL_HEADS,
    "gemma2": _SMALL_HEADS,
    "gemma3": dict(_SMALL_HEADS, sliding_window=16),  # the text model (model_type gemma3_text)
    "phi": _DECODER,
    "phi3": _DECODER,
    "stablelm": _DECODER,
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "granite": _DECODER,
    "starcoder2": _DECODER,
}
_MODEL_TYPE = {"gemma3": "gemma3_text"}
# Encoder classifiers beyond bert/distilbert (BERT's tokenizer; the wider init of INIT_RANGE).
CLASSIFIER_CONFIGS: dict[str, dict] = {
    name: dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               max_position_embeddings=128)
    for name in ("roberta", "electra", "deberta-v2")
}
ALL_FAMILIES = FAMILIES + list(CAUSAL_CONFIGS) + ["bart"] + list(CLASSIFIER_CONFIGS)

def block_tensors(editor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every target's committed blocks (``editor.blocks()`` may return views)."""
    return {name: (A.clone(), B.clone()) for name, (A, B) in editor.blocks().items()}
