"""The independent computation tests/test_eval.py checks the harness against: the GRACE/MELO protocol written
out plainly (:func:`by_hand`), every question through the model and every score computed here
(:class:`ByHand`), sharing no answering or scoring code with the harness."""

from __future__ import annotations

import math

import torch

import melo_fast
from melo_fast.config import MeloConfig
from melo_fast.eval import metrics
from melo_fast.eval.harness import SequentialEval


class ByHand:
    """A model's answers, scores and perplexity computed directly, without the harness's tasks.

    Classifier: the class of the largest logit, the answer's name; score = equality.
    Causal LM: each question alone (no padding), greedy ``generate`` of as many new tokens as the
    expected answer has; score = token-F1 (:func:`metrics.token_f1`, itself checked on exact
    values above); perplexity of ``target_new`` from one unpadded forward per record.
    """

    def __init__(self, model, tokenizer, class_names=None):
        self.model, self.tokenizer, self.class_names = model, tokenizer, class_names

    @torch.no_grad()
    def answers(self, texts, expected):
        if self.class_names is not None:
            self.tokenizer.padding_side = "right"
            logits = self.model(**self.tokenizer(list(texts), padding=True, return_tensors="pt")).logits
            return [self.class_names[i] for i in logits.argmax(-1).tolist()]
        out = []
        for text, answer in zip(texts, expected, strict=True):
            n = len(self.tokenizer(" " + answer.lstrip(), add_special_tokens=False).input_ids)
            ids = self.tokenizer(text, return_tensors="pt")
            generated = self.model.generate(**ids, max_new_tokens=n, do_sample=False, num_beams=1,
                                            pad_token_id=self.tokenizer.eos_token_id)
            new = generated[0, ids.input_ids.shape[1]:]
            out.append(self.tokenizer.decode(new, skip_special_tokens=True).strip())
        return out

    def score(self, answers, references):
        if self.class_names is not None:
            return [float(a == r) for a, r in zip(answers, references, strict=True)]
        return [metrics.token_f1(a, r) for a, r in zip(answers, references, strict=True)]

    @torch.no_grad()
    def perplexity(self, records):
        values = []
        for r in records:
            prompt = self.tokenizer(r.prompt).input_ids
            target = self.tokenizer(" " + r.target_new.lstrip(), add_special_tokens=False).input_ids
            # labels -100 on the prompt: melo_fast keys an edit-shaped row by its prompt, as generation does
            labels = torch.tensor([[-100] * len(prompt) + target])
            log_p = self.model(input_ids=torch.tensor([prompt + target]), labels=labels).logits[0].log_softmax(-1)
            nll = [-log_p[len(prompt) + j - 1, token].item() for j, token in enumerate(target)]
            values.append(math.exp(sum(nll) / len(nll)))
        return sum(values) / len(values)


def by_hand(hand: ByHand, harness: SequentialEval, edit_batch, method: str, config: MeloConfig, seed: int) -> dict:
    """The GRACE/MELO protocol written out plainly: every question through the model, no caching.

    Shares only the record split and the edit batches (``edit_batch``: the training input) with
    the harness; every answer, score and mean is computed here.
    """
    mean = metrics.mean
    model = hand.model
    edited, held = harness.edited, harness.held
    targets = [r.target_new for r in edited]
    generate = [(g, r.target_new) for r in edited for g in r.generate_prompts]
    relation = [p for r in edited + held for probes in r.locality.values() for p in probes]
    held_texts = [r.prompt for r in held] + [r.rephrase_prompt for r in held]
    held_truth = [r.ground_truth[0] for r in held] * 2
    relation_before = hand.answers([p.prompt for p in relation], [p.ground_truth[0] for p in relation])
    held_before = hand.answers(held_texts, held_truth)

    torch.manual_seed(seed)
    if method == "melo":
        editor = melo_fast.patch(model, config)
        edit, finish = editor.edit, lambda: melo_fast.unpatch(model)
    else:  # the baseline as the docs define it: one LoRA of rank rank_per_block x batches on MELO's targets
        from melo_fast.eval.baselines import SequentialLoRA
        from melo_fast.patching import default_names

        lora = SequentialLoRA(model, config.targets or default_names(model)[1],
                              config.rank_per_block * len(harness.batches), config.scale, config.edit_lr,
                              config.num_iter, config.scheduler_step, config.scheduler_gamma, backend=config.backend)
        edit, finish = lora.edit, lora.remove
    try:
        es = []
        for batch in harness.batches:
            edit(edit_batch(batch))
            wanted = [r.target_new for r in batch]
            es += hand.score(hand.answers([r.prompt for r in batch], wanted), wanted)
        relation_after = hand.answers([p.prompt for p in relation], [p.ground_truth[0] for p in relation])
        held_after = hand.answers(held_texts, held_truth)
        kept = hand.score(relation_after, relation_before) + hand.score(held_after, held_before)
        out = {
            "es": mean(es),
            "err": mean(hand.score(hand.answers([r.prompt for r in edited], targets), targets)),
            "generality_rephrase": mean(hand.score(hand.answers([r.rephrase_prompt for r in edited], targets),
                                                   targets)),
            "generality_generate": mean(hand.score(hand.answers([g for g, _ in generate], [t for _, t in generate]),
                                                   [t for _, t in generate])),
            "locality_relation": mean(hand.score(relation_after, relation_before)),
            "locality": mean(kept),
        }
        if held:
            out["locality_unedited"] = mean(hand.score(held_after, held_before))
        if hand.class_names is None:
            out["perplexity_target_new"] = hand.perplexity(edited)
    finally:
        finish()
    return out
