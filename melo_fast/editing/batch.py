"""The edit batch: what one edit trains on, checked before any work, and built from text.

An edit batch is the dict the model itself takes, with HF-style ``labels``: token ids with -100 on
the prompt for causal LMs (the key is read at the last prompt token, so the bare prompt finds its edit
at inference), decoder labels for seq2seq, class ids for classifiers. :class:`EditBatch` holds one,
checked for the patched model's kind, and gives each row's edit target as the database compares it.
The editor and the evaluation harness both use it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from melo_fast.routing.keys import check_token_ids
from melo_fast.targets import ModelKind


@dataclass(frozen=True)
class EditBatch:
    """One checked edit batch (:meth:`check` makes one).

    Attributes:
        inputs: the dict the model takes, ``labels`` included (``[N, ...]`` tensors on the model's device).
        kind: the kind of model it was checked for.
    """

    inputs: Mapping[str, torch.Tensor]
    kind: ModelKind

    @classmethod
    def check(cls, batch: Mapping[str, torch.Tensor], kind: ModelKind, device: torch.device) -> EditBatch:
        """Every check a batch needs before any work: type, device, sizes, and labels that supervise.

        Raises:
            TypeError: ``batch`` is not a dict (a Mapping).
            ValueError: no labels, a tensor on another device than ``device``, a scalar, an empty batch,
                entries that disagree on the batch size, token ids that are not integers, or labels of the
                wrong shape for ``kind`` or that leave a row without a target (the message names the rows).
        """
        if not isinstance(batch, Mapping):
            raise TypeError(f"melo_fast: an edit batch is the dict the model takes, got {type(batch).__name__}")
        if batch.get("labels") is None:
            raise ValueError(
                "melo_fast: the edit batch has no 'labels'. Add HF-style labels (token ids with -100 on the "
                "prompt for causal LMs, target ids for seq2seq, class ids for classifiers) or use edit_texts()."
            )
        sizes = set()
        for name, value in batch.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.device != device:
                raise ValueError(
                    f"melo_fast: batch[{name!r}] is on {value.device} but the model is on {device}; "
                    "move the batch with {k: v.to(device) for k, v in batch.items()}"
                )
            if value.dim() == 0:
                raise ValueError(f"melo_fast: batch[{name!r}] is a scalar; every entry needs a batch dimension")
            sizes.add(value.shape[0])
        if sizes == {0}:
            raise ValueError("melo_fast: the edit batch is empty")
        if len(sizes) != 1:
            raise ValueError(f"melo_fast: batch entries disagree on the batch size: {sorted(sizes)}")
        check_token_ids(batch, "batch")
        _check_labels(batch["labels"], batch.get("input_ids"), kind)
        return cls(batch, kind)

    @classmethod
    def from_texts(
        cls,
        model: nn.Module,
        prompts: list[str],
        targets: list,
        tokenizer,
        max_length: int | None = None,
        paraphrases: list[list[str]] | None = None,
    ) -> EditBatch:
        """The edit batch for ``prompts`` → ``targets`` (see :func:`build_edit_batch`)."""
        kind = ModelKind.of(model)
        return cls(_tokenize(model, kind, prompts, targets, tokenizer, max_length, paraphrases), kind)

    @property
    def size(self) -> int:
        """Number of rows (edits) N."""
        return self.inputs["labels"].shape[0]

    @property
    def targets(self) -> list[tuple[int, ...]]:
        """The edit target of each row as a tuple of ints (its supervised labels), compared exactly by the
        database: two rows with equal tuples ask for the same answer."""
        labels = self.inputs["labels"]
        if labels.dim() == 1:
            return [(value,) for value in labels.tolist()]
        return [tuple(v for v in row if v != -100) for row in labels.reshape(labels.shape[0], -1).tolist()]


def build_edit_batch(
    model: nn.Module,
    prompts: list[str],
    targets: list,
    tokenizer,
    max_length: int | None = None,
    paraphrases: list[list[str]] | None = None,
):
    """The edit batch for ``prompts`` → ``targets``, on the model's device (the dict the model takes).

    - causal LMs: ``prompt + " " + target`` right-padded; labels are -100 on the prompt and padding;
    - seq2seq: encoder inputs from the prompts, decoder labels from the targets (-100 on padding);
    - classifiers: ``targets`` are class ids or label names (``model.config.label2id``).

    ``max_length`` (optional) truncates every prompt to that many tokens (on the tokenizer's
    truncation side) for every kind of model; targets are never truncated.

    ``paraphrases`` (optional): one list per prompt (``[]`` for none) of other wordings of that prompt,
    each one more row with its prompt's target. Rows: the prompts first (row ``i`` is prompt ``i``, as
    without paraphrases), then ``paraphrases[0]``, ``paraphrases[1]``, ... in order.

    Raises TypeError unless ``prompts`` and ``targets`` are lists (or tuples) of the same length, or naming
    the index of a target that is not text (for classifiers: not a label name or an int class id), and
    ValueError naming the index of an empty or whitespace-only prompt or target, or an unknown label.
    With ``paraphrases``: TypeError if it is not a list, or naming the entry that is not a list or the
    paraphrase that is not text; ValueError if it has not one entry per prompt, or naming a paraphrase that
    is empty or repeats a prompt or paraphrase of the batch.
    """
    return dict(EditBatch.from_texts(model, prompts, targets, tokenizer, max_length, paraphrases).inputs)


def _check_labels(labels: torch.Tensor, input_ids: torch.Tensor | None, kind: ModelKind) -> None:
    """Labels must have the model kind's shape and supervise something in every row (ValueError)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError("melo_fast: batch['labels'] must be an integer tensor (token ids or class ids)")
    if kind.causal_lm:
        if input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"melo_fast: causal-LM labels must have input_ids' shape {tuple(input_ids.shape)} (-100 on the "
                f"prompt and padding), got {tuple(labels.shape)}"
            )
        what = "target tokens (all labels are -100)"
    elif kind.seq2seq:
        if labels.dim() != 2:
            raise ValueError(
                f"melo_fast: seq2seq labels must be [N, T_target] decoder token ids, got shape {tuple(labels.shape)}"
            )
        what = "target tokens (all labels are -100)"
    else:
        if labels.dim() not in (1, 2):
            raise ValueError(
                "melo_fast: classifier labels must be [N] class ids (or [N, T] per token), "
                f"got shape {tuple(labels.shape)}"
            )
        what = "class id (label -100)"
    supervised = (labels != -100).reshape(labels.shape[0], -1).any(dim=1)
    if not bool(supervised.all()):
        rows = (~supervised).nonzero().flatten().tolist()
        raise ValueError(f"melo_fast: edit rows {rows} have no {what}; every row needs a target")


def _tokenize(model: nn.Module, kind: ModelKind, prompts, targets, tokenizer, max_length, paraphrases=None) -> dict:
    for name, value in (("prompts", prompts), ("targets", targets)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"melo_fast: {name} must be a list (one entry per edit), got {type(value).__name__}")
    if len(prompts) != len(targets):
        raise ValueError(f"melo_fast: {len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("melo_fast: no prompts to edit")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"melo_fast: prompt {i} is {prompt!r}; every prompt must be non-empty text")
    _check_target_types(kind, targets)
    for i, target in enumerate(targets):
        if isinstance(target, str) and not target.strip():
            raise ValueError(f"melo_fast: target {i} is {target!r}; every target must be non-empty")
    prompts, targets = _with_paraphrases(prompts, targets, paraphrases)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    truncate = {"truncation": max_length is not None, "max_length": max_length}
    if kind.seq2seq:
        inputs = tokenizer(list(prompts), padding=True, return_tensors="pt", **truncate)
        labels = tokenizer(list(targets), padding=True, return_tensors="pt").input_ids
        labels[labels == pad_id] = -100
        batch = {**inputs, "labels": labels}
    elif kind.causal_lm:
        rows = []
        for prompt, target in zip(prompts, targets, strict=True):
            prompt_ids = tokenizer(prompt, **truncate)["input_ids"]
            target_ids = tokenizer(" " + target.lstrip(), add_special_tokens=False)["input_ids"]
            rows.append((prompt_ids, target_ids))
        length = max(len(p) + len(t) for p, t in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (prompt_ids, target_ids) in enumerate(rows):
            ids = prompt_ids + target_ids
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, len(prompt_ids) : len(ids)] = torch.tensor(target_ids)
            attention_mask[i, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    else:
        inputs = tokenizer(list(prompts), padding=True, return_tensors="pt", **truncate)
        batch = {**inputs, "labels": torch.tensor(_class_ids(model.config, targets), dtype=torch.long)}
    return {name: value.to(device) for name, value in batch.items()}


def _with_paraphrases(prompts, targets, paraphrases) -> tuple[list, list]:
    """The rows of the batch: the prompts, then every paraphrase with its prompt's target (checked first).

    A phrasing given twice is refused rather than dropped: most likely a slip (a paraphrase pasted
    under the wrong prompt would train it to the wrong answer), and as a second row it would only
    weigh that wording twice.
    """
    if paraphrases is None:
        return prompts, targets
    if not isinstance(paraphrases, (list, tuple)):
        raise TypeError(
            "melo_fast: paraphrases must be a list with one list of other wordings per prompt, "
            f"got {type(paraphrases).__name__}"
        )
    if len(paraphrases) != len(prompts):
        raise ValueError(
            f"melo_fast: {len(prompts)} prompts but {len(paraphrases)} paraphrase lists; give one list per "
            "prompt ([] for a prompt without paraphrases)"
        )
    rows, row_targets = list(prompts), list(targets)
    seen: dict[str, str] = {}
    for i, prompt in enumerate(prompts):
        seen.setdefault(prompt.strip(), f"prompt {i}")
    for i, wordings in enumerate(paraphrases):
        if not isinstance(wordings, (list, tuple)):
            raise TypeError(
                f"melo_fast: paraphrases[{i}] has type {type(wordings).__name__} ({wordings!r:.60}); each entry "
                f"must be a list of other wordings of prompt {i} ([] for none)"
            )
        for j, text in enumerate(wordings):
            where = f"paraphrases[{i}][{j}]"
            if not isinstance(text, str):
                raise TypeError(
                    f"melo_fast: {where} has type {type(text).__name__} ({text!r:.60}); a paraphrase must be text (str)"
                )
            if not text.strip():
                raise ValueError(f"melo_fast: {where} is {text!r}; every paraphrase must be non-empty text")
            first = seen.setdefault(text.strip(), where)
            if first != where:
                raise ValueError(
                    f"melo_fast: {where} ({text!r:.60}) repeats {first}; give each wording once per batch "
                    "(a paraphrase must differ from every prompt and paraphrase of the batch)"
                )
            rows.append(text)
            row_targets.append(targets[i])
    return rows, row_targets


def _check_target_types(kind: ModelKind, targets) -> None:
    """Targets of generative models must be text; a classifier's may also be class ids (TypeError otherwise).

    Tokenizing ``str(target)`` would train ``None`` as the answer " None" and ``["a", "b"]`` as
    " ['a', 'b']": a silent wrong edit, so anything else is refused before any work.
    """
    generative = kind.causal_lm or kind.seq2seq
    for i, target in enumerate(targets):
        class_id = isinstance(target, numbers.Integral) and not isinstance(target, bool)
        if isinstance(target, str) or (class_id and not generative):
            continue
        allowed = "text (str)" if generative else "label names (str) or class ids (int)"
        raise TypeError(
            f"melo_fast: target {i} has type {type(target).__name__} ({target!r:.60}); the targets of this "
            f"{'model' if generative else 'classifier'} must be {allowed}"
        )


def _class_ids(config, targets) -> list[int]:
    """Class ids of ``targets`` (ids, or names looked up in ``config.label2id``); ValueError if unknown."""
    label2id = getattr(config, "label2id", {}) or {}
    num_labels = getattr(config, "num_labels", None)
    ids = []
    for i, target in enumerate(targets):
        if isinstance(target, str):
            if target not in label2id:
                raise ValueError(
                    f"melo_fast: target {i} {target!r} is not a label of this model; valid labels: {sorted(label2id)}"
                )
            ids.append(int(label2id[target]))
        else:
            ids.append(int(target))
        if num_labels is not None and not 0 <= ids[-1] < num_labels:
            raise ValueError(f"melo_fast: target {i} is class {ids[-1]}, but the model has classes 0..{num_labels - 1}")
    return ids
