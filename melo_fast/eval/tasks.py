"""Task adapters: how to turn records into an edit batch and how to ask a model a question.

The harness is generic over two adapters:

- :class:`ClassifierTask`: a sequence classifier whose classes are answers (the demo's MiniLM
  classifier, or any HF ``...ForSequenceClassification`` whose ``id2label`` names the answers).
  The answer is the predicted class's name; the metric is accuracy.
- :class:`GenerativeTask`: a seq2seq or causal LM; the answer is its greedy generation; the metric
  is token-F1 (and exact match), as MELO reports for zsRE. It also reads teacher-forced predictions
  (``forced_batch`` + ``forced_tokens``: the argmax token at each answer position of
  ``prompt + answer``), the measurement of EasyEdit-style tables, and can ask every question
  through the tokenizer's chat template (``chat=True``).

Both expose the same four methods: ``encode(texts)``, ``answer(inputs, max_tokens)``,
``edit_batch(records)`` and ``score(answer, references)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from melo_fast.editor import build_edit_batch
from melo_fast.eval import metrics
from melo_fast.eval.data import EditRecord


class ClassifierTask:
    """Question → class id; the class names are the answers.

    Args:
        model: returns ``.logits [N, num_classes]``; takes ``labels [N]`` for the edit loss.
        tokenizer: its tokenizer (right padding).
        answers: class id → answer string; None reads ``model.config.id2label``.
    """

    kind = "classifier"
    primary = "accuracy"

    def __init__(self, model, tokenizer, answers: Sequence[str] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if answers is None:
            id2label = getattr(model.config, "id2label", None) or {}
            answers = [str(id2label[i]) for i in range(len(id2label))]
        self.answers = list(answers)
        self.answer_ids = {answer: i for i, answer in enumerate(self.answers)}

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "right"
        return dict(self.tokenizer(list(texts), padding=True, return_tensors="pt"))

    def token_lengths(self, answers: Sequence[str]) -> list[int] | None:
        return None  # a class needs no generation budget

    @torch.no_grad()
    def answer(self, inputs: dict[str, torch.Tensor], max_tokens: Sequence[int] | None = None) -> list[str]:
        """The predicted answer (class name) of every row of ``inputs``."""
        logits = self.model(**inputs).logits
        return [self.answers[i] for i in logits.argmax(-1).tolist()]

    def class_id(self, record: EditRecord) -> int:
        if record.target_new in self.answer_ids:
            return self.answer_ids[record.target_new]
        raise ValueError(
            f"record {record.index}: target_new {record.target_new!r} is not a class of this classifier "
            f"({len(self.answers)} classes, e.g. {self.answers[:5]})"
        )

    def edit_batch(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """Edit prompts → class ids of ``target_new`` (``labels [N]`` int64)."""
        batch = self.encode([r.prompt for r in records])
        batch["labels"] = torch.tensor([self.class_id(r) for r in records], dtype=torch.long)
        return batch

    def score(self, answer: str, references: Sequence[str]) -> dict[str, float]:
        """``{"accuracy": 1.0}`` if the answer is one of the accepted references, else 0.0."""
        return {"accuracy": float(answer in references)}


class GenerativeTask:
    """Question → greedy generation (seq2seq or causal LM); scored by token-F1 and exact match.

    For causal LMs the prompt is left-padded and the generation is cut to the token length of the
    answer it is compared with (a causal LM does not stop after the answer); seq2seq models stop
    at their end-of-sequence token.

    Args:
        model, tokenizer: the model and its tokenizer.
        extra_tokens: seq2seq generation budget beyond the answer's length.
        chat: ask every question (edits, probes, teacher forcing) as one user turn of the tokenizer's
            chat template, the answer following the assistant header; causal LMs only.
    """

    primary = "token_f1"

    def __init__(self, model, tokenizer, extra_tokens: int = 4, chat: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.kind = "seq2seq" if self.seq2seq else "causal"
        self.extra_tokens = extra_tokens
        if chat and (self.seq2seq or not getattr(tokenizer, "chat_template", None)):
            raise ValueError("chat prompts need a causal LM whose tokenizer has a chat template "
                             f"({'a seq2seq model' if self.seq2seq else 'this tokenizer has none'})")
        self.chat = chat
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def prompt_text(self, text: str) -> str:
        """``text`` as the model is asked it: itself, or one user turn of the chat template.

        A template that writes the BOS token itself would get a second one from a tokenizer that
        adds BOS on its own, so the template's is dropped then.
        """
        if not self.chat:
            return text
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and rendered.startswith(bos) and self.tokenizer("x").input_ids[:1] == [self.tokenizer.bos_token_id]:
            rendered = rendered[len(bos):]
        return rendered

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "right" if self.seq2seq else "left"
        return dict(self.tokenizer([self.prompt_text(t) for t in texts], padding=True, return_tensors="pt"))

    def key_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``inputs`` for reading keys with a plain forward, as ``generate`` will see them.

        ``generate`` numbers a left-padded row's positions from its first real token; a plain
        forward would number them from the padding, and a model with absolute positions (GPT-2)
        would then give another key than the one routed at prefill. So pass the same positions.
        """
        if self.seq2seq or "position_ids" not in inspect.signature(self.model.forward).parameters:
            return inputs
        mask = inputs["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return {**inputs, "position_ids": positions}

    def token_lengths(self, answers: Sequence[str]) -> list[int]:
        """Tokens to generate for each expected answer (its own token length, at least 1)."""
        if self.seq2seq:
            return [max(1, len(self.tokenizer(a).input_ids)) for a in answers]
        return [max(1, len(self.tokenizer(" " + a.lstrip(), add_special_tokens=False).input_ids)) for a in answers]

    @torch.no_grad()
    def answer(self, inputs: dict[str, torch.Tensor], max_tokens: Sequence[int] | None = None) -> list[str]:
        """Greedy answers of every row of ``inputs`` (``max_tokens[i]`` tokens for row i)."""
        n = inputs["input_ids"].shape[0]
        lengths = list(max_tokens) if max_tokens is not None else [16] * n
        budget = max(lengths) + (self.extra_tokens if self.seq2seq else 0)
        out = self.model.generate(
            **inputs,
            max_new_tokens=budget,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        generated = out[:, 1:] if self.seq2seq else out[:, inputs["input_ids"].shape[1] :]
        answers = []
        for row, length in zip(generated.tolist(), lengths, strict=True):
            if not self.seq2seq:
                row = row[:length]
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers

    def edit_batch(self, records: Sequence[EditRecord]) -> dict[str, torch.Tensor]:
        """Prompts → ``target_new`` as melo_fast's edit batch (labels -100 on prompt and padding)."""
        return self.forced_batch([r.prompt for r in records], [r.target_new for r in records])

    def forced_batch(self, prompts: Sequence[str], answers: Sequence[str]) -> dict[str, torch.Tensor]:
        """``prompt + answer`` rows laid out as an edit batch: ``labels`` hold the answer's tokens, -100
        elsewhere (so MELO keys each row at its last prompt token, as in generation)."""
        self.tokenizer.padding_side = "right"  # build_edit_batch lays out causal rows itself
        return build_edit_batch(self.model, [self.prompt_text(p) for p in prompts], list(answers), self.tokenizer)

    def _aligned(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, T', V], labels [N, T'])`` of a labelled batch, position t predicting labels[t]."""
        logits = self.model(**batch).logits
        labels = batch["labels"]
        if not self.seq2seq:  # position t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return logits, labels

    @torch.no_grad()
    def forced_tokens(self, batch: dict[str, torch.Tensor]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Per row of a :meth:`forced_batch`: ``(argmax tokens, answer tokens)`` at the answer positions."""
        return metrics.forced_predictions(*self._aligned(batch))

    def score(self, answer: str, references: Sequence[str]) -> dict[str, float]:
        """Best token-F1 and exact match of ``answer`` against the accepted references."""
        return {
            "token_f1": metrics.best_over_references(metrics.token_f1, answer, references),
            "exact_match": metrics.best_over_references(metrics.exact_match, answer, references),
        }

    @torch.no_grad()
    def perplexity(self, records: Sequence[EditRecord], batch_size: int = 32) -> list[float]:
        """Teacher-forced perplexity of ``target_new`` given the prompt, one value per record."""
        values = []
        for start in range(0, len(records), batch_size):
            values += metrics.perplexity(*self._aligned(self.edit_batch(records[start : start + batch_size]))).tolist()
        return values


def task_for(model, tokenizer, answers: Sequence[str] | None = None, chat: bool = False):
    """The adapter for ``model``: generative if it can generate, else a classifier (``chat``: see
    :class:`GenerativeTask`; a classifier has no chat template)."""
    can_generate = hasattr(model, "can_generate") and model.can_generate()
    if can_generate or getattr(model.config, "is_encoder_decoder", False):
        return GenerativeTask(model, tokenizer, chat=chat)
    if chat:
        raise ValueError("chat prompts need a generative model; this one is a classifier")
    return ClassifierTask(model, tokenizer, answers)
