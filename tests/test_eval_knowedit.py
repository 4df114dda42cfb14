"""Any KnowEdit-format file, not only zsRE: the loader's variants and errors, and the harness scoring
every probe a file has (other locality kinds, portability kinds, records without a paraphrase), with
the teacher-forced aggregation checked on hand-made readings."""

from __future__ import annotations

import json

import pytest
import torch

from melo_fast.eval.data import DataError, Probe, load_records
from melo_fast.eval.harness import SequentialEval, Settings, forced_name, probe_set_name


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


# --- the loader -----------------------------------------------------------------------------------

COUNTERFACT = {  # the shape of KnowEdit's WikiData counterfact files: strings, no rephrase_prompt
    "subject": "Frederic Piesch",
    "prompt": "The name of the position held by Frederic Piesch is",
    "target_new": "Archbishop of Leon",
    "ground_truth": "mayor of Vienna",
    "portability": {"Subject_Aliasing": [{"prompt": "The position held by Frederic of Pieschen is",
                                          "ground_truth": "Archbishop of Leon"}]},
    "locality": {"Relation_Specificity": [{"prompt": "The gender of Frederic Piesch is", "ground_truth": "male"}],
                 "Forgetfulness": [{"prompt": "The position held by Frederic Piesch, which is not Archbishop of "
                                              "Leon, is", "ground_truth": "mayor of Vienna"}]},
}
RECENT = {  # WikiData recent: no ground_truth (knowledge insertion), answers as lists of alias lists
    "subject": "Leo Arons",
    "prompt": "The place of death of Leo Arons is",
    "target_new": "Berlin",
    "portability": {
        "Logical_Generalization": [{"prompt": "Is Leo Arons still alive?", "ground_truth": [["no"], ["incorrect"]]}],
        "Reasoning": [{"prompt": "The continent of the place of death of Leo Arons is",
                       "ground_truth": [["Europe", "European continent"], ["Europe"]]}],
    },
    "locality": {"Relation_Specificity": [{"prompt": "The father of Leo Arons is",
                                           "ground_truth": [["Albert Arons"]]}]},
}


def test_knowedit_variants_load(tmp_path):
    zsre = {"prompt": "Which family does Epaspidoceras belong to?", "ground_truth": ["Aspidoceratidae"],
            "target_new": "Noctuidae", "rephrase_prompt": "What family are Epaspidoceras?", "cond": "ignored",
            "portability": {"Reasoning": [{"prompt": "What is the common name of that family?",
                                           "ground_truth": "Owlet moths"}]}}
    counterfact, recent, zsre_record = load_records(write(tmp_path, [COUNTERFACT, RECENT, zsre]))
    assert counterfact.ground_truth == ["mayor of Vienna"] and counterfact.rephrase_prompt is None
    assert counterfact.locality["Forgetfulness"][0].ground_truth == ["mayor of Vienna"]
    assert counterfact.portability == {"Subject_Aliasing": [Probe("The position held by Frederic of Pieschen is",
                                                                  ["Archbishop of Leon"])]}
    assert recent.ground_truth == [] and recent.original_answer == "Berlin"
    assert recent.portability["Reasoning"][0].ground_truth == ["Europe", "European continent"]  # aliases, once
    assert recent.portability["Logical_Generalization"][0].ground_truth == ["no", "incorrect"]
    assert zsre_record.ground_truth == ["Aspidoceratidae"] and zsre_record.original_answer == "Aspidoceratidae"
    assert zsre_record.portability["Reasoning"][0].ground_truth == ["Owlet moths"]
    assert probe_set_name("locality", "Relation_Specificity") == "locality_relation"
    assert probe_set_name("portability", "Subject_Aliasing") == "portability_subject_aliasing"
    assert forced_name("locality_forgetfulness") == "locality_acc_forgetfulness"
    assert forced_name("edit") == "rewrite_acc"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(ground_truth=[["x"], [""]]), "record 1: field 'ground_truth' must hold non-empty strings"),
        (lambda r: r.update(ground_truth=[]), "record 1: field 'ground_truth' must not be empty"),
        (lambda r: r.update(ground_truth=7), "record 1: field 'ground_truth' must be a string or a list"),
        (lambda r: r.update(rephrase_prompt=""), "record 1: field 'rephrase_prompt' must be a non-empty string"),
        (lambda r: r["portability"].update(Reasoning={"prompt": "x"}),
         "record 1: field 'portability.Reasoning' must be a list"),
        (lambda r: r["portability"]["Logical_Generalization"][0].pop("ground_truth"),
         r"record 1: field 'portability.Logical_Generalization\[0\].ground_truth' is missing"),
        (lambda r: r["locality"]["Relation_Specificity"].append("The father?"),
         r"record 1: field 'locality.Relation_Specificity\[1\]' must be an object"),
        (lambda r: r.update(locality=["x"]), "record 1: field 'locality' must be an object"),
        (lambda r: r.update(generate_prompt=[1]), "record 1: field 'generate_prompt' must be a list of strings"),
    ],
)
def test_malformed_knowedit_records_name_the_record_and_field(tmp_path, mutate, message):
    records = json.loads(json.dumps([COUNTERFACT, RECENT]))
    mutate(records[1])
    with pytest.raises(DataError, match=message):
        load_records(write(tmp_path, records))


def test_a_malformed_record_stops_the_command_before_any_model_is_loaded(tmp_path, monkeypatch):
    from melo_fast.cli import main
    from melo_fast.eval import demo, local_model

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    for name in ("load_smollm2", "smollm2_folder", "load_local_model"):
        monkeypatch.setattr(local_model, name, no_model)
    monkeypatch.setattr(demo, "_deploy_minilm", no_model)
    bad = write(tmp_path, [COUNTERFACT] * 30 + [{**RECENT, "locality": {"Relation_Specificity": [{"prompt": 3}]}}])
    for argv in (["demo"], ["demo", "--model", "minilm"], ["eval", "--model", str(tmp_path)]):
        with pytest.raises(SystemExit, match=r"record 30: field 'locality.Relation_Specificity\[0\].prompt'"):
            main([*argv, "--data", str(bad), "--out", str(tmp_path / "out")])


# --- the harness scores every probe, teacher-forced aggregation on hand-made readings --------------


class ForcedTableTask:
    """A stand-in generative task: generations and teacher-forced readings come from tables the test
    writes (question -> answer, question -> (argmax tokens, answer tokens)), read at call time so that
    a test can change them between the unedited pass and the final one, as an edit would."""

    kind = "causal"
    primary = "token_f1"

    def __init__(self, answers: dict[str, str], readings: dict[str, tuple]):
        self.answers, self.readings = dict(answers), dict(readings)
        self.questions: list[str] = []

    def _ids(self, texts):
        for text in texts:
            if text not in self.questions:
                self.questions.append(text)
        return torch.tensor([[self.questions.index(text)] for text in texts])

    def token_lengths(self, answers):
        return [1] * len(answers)

    def encode(self, texts):
        return {"input_ids": self._ids(texts)}

    def forced_batch(self, prompts, answers):
        return {"input_ids": self._ids(prompts)}

    def answer(self, inputs, max_tokens=None):
        return [self.answers.get(self.questions[i], "") for i in inputs["input_ids"][:, 0].tolist()]

    def forced_tokens(self, batch):
        return [self.readings[self.questions[i]] for i in batch["input_ids"][:, 0].tolist()]

    def score(self, answer, references):
        return {"token_f1": float(answer in references)}

    def perplexity(self, records):
        return [1.0] * len(records)


def test_every_probe_is_scored_and_teacher_forcing_aggregates_as_derived_by_hand(tmp_path):
    def probes(*pairs):
        return [{"prompt": p, "ground_truth": a} for p, a in pairs]

    records = load_records(write(tmp_path, [
        {"prompt": "e0", "target_new": "T0", "ground_truth": "G0", "rephrase_prompt": "r0",
         "locality": {"Relation_Specificity": probes(("l0", "L"))},
         "portability": {"Reasoning": probes(("p0a", "P"), ("p0b", "P"))}},
        {"prompt": "e1", "target_new": "T1", "ground_truth": "G1",  # no rephrase_prompt
         "locality": {"Forgetfulness": probes(("f1", "G1"))},
         "portability": {"Subject_Aliasing": probes(("s1", "T1"))}},
        {"prompt": "e2", "target_new": "T2", "ground_truth": "G2", "rephrase_prompt": "r2"},
        {"prompt": "h3", "target_new": "T3", "ground_truth": "G3",  # held out (every 4th)
         "locality": {"Relation_Specificity": probes(("l3", "L"))},
         "portability": {"Reasoning": probes(("p3", "P"))}},  # never edited: not a portability question
    ]))
    before = {  # readings of the unedited model: (argmax tokens, answer tokens)
        "e0": ((9, 9), (5, 6)), "e1": ((9,), (7,)), "e2": ((9, 9, 9), (1, 2, 3)),
        "r0": ((9, 9), (5, 6)), "r2": ((9, 9, 9), (1, 2, 3)),
        "l0": ((4, 4), (8, 8)), "l3": ((4,), (8,)), "f1": ((2, 2, 2), (2, 2, 2)), "h3": ((6,), (6,)),
        "p0a": ((0,), (1,)), "p0b": ((0, 0), (1, 1)), "s1": ((0,), (7,)),
    }
    task = ForcedTableTask({"e0": "G0 G0", "e1": "G1"}, before)
    harness = SequentialEval(task, records, Settings(batch_size=2, holdout=0.25, progress=False))
    assert list(harness.sets) == ["edit", "rephrase", "generate", "locality_relation", "locality_forgetfulness",
                                  "locality_unedited", "portability_reasoning", "portability_subject_aliasing",
                                  "continuation"]
    assert harness.sets["rephrase"].owners == [0, 2]  # record 1 has no paraphrase
    assert harness.sets["locality_unedited"].texts == ["h3"]  # the held-out record has no paraphrase either
    assert harness.sets["portability_reasoning"].texts == ["p0a", "p0b"]
    unedited = harness.run_unedited()
    assert unedited.metrics["locality_acc"] == 1.0 and unedited.metrics["rewrite_acc"] == 0.0

    task.readings.update({
        "e0": ((5, 6), (5, 6)), "e1": ((9,), (7,)), "e2": ((1, 9, 3), (1, 2, 3)),  # rewrite (1 + 0 + 2/3) / 3
        "r0": ((5, 9), (5, 6)), "r2": ((1, 2, 3), (1, 2, 3)),  # rephrase (1/2 + 1) / 2
        "l0": ((4, 5), (8, 8)),  # 1 of 2 positions keeps the unedited argmax (not the answer: 0 of 2)
        "f1": ((2, 2, 0), (2, 2, 2)),  # 2/3 against the unedited argmax
        "h3": ((0,), (6,)),  # 0/1
        "p0a": ((1,), (1,)), "p0b": ((1, 0), (1, 1)), "s1": ((7,), (7,)),  # reasoning (1 + 1/2) / 2, aliasing 1
    })
    task.answers.update({"e0": "T0 and T0 again: t0!", "e1": "T1 is new", "e2": "nothing"})  # continuations
    got = harness.final_metrics(harness.answerer.full, {"token_f1": 1.0}, harness.forcer.full, 0.5)
    assert got["rewrite_acc_at_edit"] == 0.5
    assert got["rewrite_acc"] == pytest.approx((1 + 0 + 2 / 3) / 3)  # a mean over records, not over tokens (3/6)
    assert got["rephrase_acc"] == pytest.approx(3 / 4)
    assert got["locality_acc_relation"] == pytest.approx((1 / 2 + 1) / 2)  # l3 unchanged
    assert got["locality_acc_forgetfulness"] == pytest.approx(2 / 3)
    assert got["locality_acc_unedited"] == 0.0
    assert got["locality_acc"] == pytest.approx((1 / 2 + 1 + 2 / 3 + 0) / 4)  # over the 4 locality questions
    assert got["portability_acc_reasoning"] == pytest.approx(3 / 4)
    assert got["portability_acc_subject_aliasing"] == 1.0
    assert got["portability_acc"] == pytest.approx((1 + 1 / 2 + 1) / 3)  # over the 3 portability questions
    assert got["target_repetition"] == pytest.approx(1 / 3)  # "T0 ... T0 ... t0" names T0 three times
    assert set(got) >= {"portability_reasoning", "portability_subject_aliasing", "portability",
                        "locality_forgetfulness", "generality_rephrase"}
