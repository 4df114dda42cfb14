"""Metric functions: the GRACE/MELO protocol's (token-F1, exact match, accuracy, perplexity), the
teacher-forced token accuracies of EasyEdit-style tables, and target repetition in a generation.

Pure functions on strings, ids or tensors, so each can be checked on hand-made cases.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(answer) -> list:
    """Words of a string (normalised) or the items of a sequence of token ids."""
    if isinstance(answer, str):
        return normalize_answer(answer).split()
    return list(answer)


def token_f1(prediction, reference) -> float:
    """Token-level F1 between two answers (SQuAD/MELO style).

    Args:
        prediction, reference: strings (compared as normalised words) or sequences of token ids.

    Returns:
        ``2 P R / (P + R)`` over the multiset of shared tokens; 1.0 when both are empty, 0.0 when
        only one is.
    """
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, reference) -> float:
    """1.0 if the answers are equal after normalisation (strings) or exactly (token ids), else 0.0."""
    return float(_tokens(prediction) == _tokens(reference))


def best_over_references(metric, prediction, references: Sequence) -> float:
    """The best score of ``prediction`` against any accepted reference (e.g. several ground truths)."""
    if isinstance(references, (str, bytes)):
        references = [references]
    return max((metric(prediction, ref) for ref in references), default=0.0)


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of positions where ``predictions[i] == references[i]``; NaN for empty inputs."""
    if len(predictions) != len(references):
        raise ValueError(f"accuracy: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return float("nan")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(predictions)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; NaN for an empty sequence (a metric with nothing to measure)."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence perplexity ``exp(mean NLL)`` of the supervised tokens.

    Args:
        logits: ``[N, T, V]`` scores already aligned with ``labels`` (position t predicts labels[t];
            shift causal-LM logits before calling).
        labels: ``[N, T]`` int64 token ids, -100 where not supervised.

    Returns:
        ``[N]`` float32; NaN for a row with no supervised token.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"perplexity: logits {tuple(logits.shape)} do not align with labels {tuple(labels.shape)}")
    mask = labels != -100
    # Over the contiguous vocabulary dim: cross_entropy on the transposed [N, V, T] layout sums the
    # softmax over a strided dim in plain fp32 order, 7e-4 off in log for a 50k vocabulary.
    n, t, v = logits.shape
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(n * t, v), labels.clamp(min=0).reshape(n * t), reduction="none"
    ).reshape(n, t)
    count = mask.sum(1)
    mean_nll = (nll * mask).sum(1) / count.clamp(min=1)
    return torch.where(count > 0, mean_nll.exp(), torch.full_like(mean_nll, math.nan))


def forced_predictions(logits: torch.Tensor, labels: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Teacher forcing: the model's argmax token at every supervised position, and the label there.

    Args:
        logits: ``[N, T, V]`` scores aligned with ``labels`` (position t predicts labels[t]; shift
            causal-LM logits before calling).
        labels: ``[N, T]`` int64 token ids, -100 where not supervised.

    Returns:
        Per row, ``(predicted, reference)``: two equally long tuples of token ids, in position order.
        Ties in the argmax go to the lowest token id.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"forced_predictions: logits {tuple(logits.shape)} do not align with labels "
                         f"{tuple(labels.shape)}")
    predicted = logits.argmax(-1).tolist()
    rows = []
    for row_predicted, row_labels in zip(predicted, labels.tolist(), strict=True):
        kept = [(p, t) for p, t in zip(row_predicted, row_labels, strict=True) if t != -100]
        rows.append((tuple(p for p, _ in kept), tuple(t for _, t in kept)))
    return rows


def token_accuracy(predicted: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of positions where two equally long token sequences agree; NaN when both are empty.

    With ``reference`` the answer's tokens this is a teacher-forced accuracy (rewrite, rephrase,
    portability); with ``reference`` the unedited model's argmax tokens it is teacher-forced locality.
    """
    if len(predicted) != len(reference):
        raise ValueError(f"token_accuracy: {len(predicted)} predicted tokens but {len(reference)} reference tokens")
    if not predicted:
        return float("nan")
    return sum(p == r for p, r in zip(predicted, reference, strict=True)) / len(predicted)


def mentions(text: str, answer: str) -> int:
    """How many times ``answer`` occurs in ``text``, as a whole run of normalised words.

    Both are normalised as in :func:`normalize_answer` (case, punctuation and articles do not count);
    occurrences do not overlap. ``mentions("Saturn, Saturn and saturn!", "Saturn") == 3``.
    """
    words, target = normalize_answer(text).split(), normalize_answer(answer).split()
    if not target:
        return 0
    count, i = 0, 0
    while i + len(target) <= len(words):
        if words[i : i + len(target)] == target:
            count, i = count + 1, i + len(target)
        else:
            i += 1
    return count
