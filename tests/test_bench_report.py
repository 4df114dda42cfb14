"""BENCHMARKS.md's generator (benchmarks/report.py) on hand-made results: ratios, verdicts, provenance."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def row(report, case, times, group="g", data=None, **info):
    stats = {"min": min(times), "median": sorted(times)[len(times) // 2], "mean": sum(times) / len(times),
             "rounds": len(times), "iqr": 0.0}
    if data is not None:
        stats["data"] = data
    raw = {"group": group, "name": case, "extra_info": {"case": case, **info}, "stats": stats,
           "options": {"timer": "perf_counter"}}
    return report.Row(raw, "min", "hand-made.json")


def test_interleaved_ratio_is_the_median_of_the_per_round_ratios(report):
    # Per round, baseline / row: 1/1, 1/2, 1/4 -> median 0.5; the ratio of the minima would be 1.
    paired = {"case": "unpatched", "min": 1.0, "median": 1.0, "rounds": 3, "times": [1.0, 1.0, 1.0]}
    patched = row(report, "patched", [1.0, 2.0, 4.0], data=[1.0, 2.0, 4.0], paired=paired)
    assert patched.paired_ratio == 0.5
    without_rounds = row(report, "patched", [1.0, 2.0, 4.0], paired={**paired, "times": None})
    assert without_rounds.paired_ratio is None  # no per-round times: no interleaved ratio at all


def edit_rows(report, block_s, ref_s, memory):
    common = dict(plot="edit", setting="tiny", num_iter=10, bank_blocks=4, group="edit tiny")
    block = dict(backend="cpp", **common)
    ref = dict(backend="reference", **common)
    if memory is not None:
        block.update(peak_tensor_bytes=memory[0], train_state_bytes=1)
        ref.update(peak_tensor_bytes=memory[1], train_state_bytes=2)
    return [row(report, "block-only", [block_s], **block), row(report, "full-rank", [ref_s], **ref)]


def test_editing_target_needs_both_time_and_memory(report):
    assert report.edit_targets(edit_rows(report, 1.0, 3.0, None))[0].met is None  # memory missing: no verdict
    assert report.edit_targets(edit_rows(report, 1.0, 3.0, (1, 2)))[0].met is True
    assert report.edit_targets(edit_rows(report, 1.0, 3.0, (2, 1)))[0].met is False  # memory not lower
    assert report.edit_targets(edit_rows(report, 1.0, 1.2, None))[0].met is False  # too slow, whatever the memory


def test_lookup_curve_without_its_largest_point_is_not_measured(report):
    points = [row(report, f"torch C={c}", [c * 1e-7], plot="lookup_vs_keys", series="torch, Q=1", x=c)
              for c in (1_000, 10_000, 100_000)]
    (target,) = report.linear_targets(points)
    assert target.met is None and "not measured" in target.measured


def peft_rows(report, single_s, mixed_s):
    return [row(report, "PEFT single", [single_s], op="layer", backend="peft", peft_mode="single", distinct=1,
                minor_faults_per_call=98_340),
            row(report, "PEFT mixed", [mixed_s], op="layer", backend="peft", peft_mode="per-sample", distinct=64,
                minor_faults_per_call=25_920)]


def test_peft_explanation_only_when_the_data_shows_it(report):
    (note, _) = report.peft_adapter_note(peft_rows(report, 0.674, 0.611))
    assert "98,340 minor page faults" in note and "25,920" in note
    assert report.peft_adapter_note(peft_rows(report, 0.5, 0.611)) == []


def test_provenance_names_the_commit_and_every_uncommitted_file(report):
    clean = {"melo_fast_source": {"commit": "0123456789abcdef", "changed": []}}
    dirty = {"melo_fast_source": {"commit": "0123456789abcdef", "changed": ["benchmarks/test_bench_layer.py"]}}
    assert report.source_of(clean) == "commit 0123456789 (package, kernels and suites as committed)"
    assert "uncommitted changes** to `benchmarks/test_bench_layer.py`" in report.source_of(dirty)


def insert_row(report, n_keys, insert_times, search_times):
    paired = {"case": "vecdb_search of the same 100 keys (cpp)", "min": min(search_times),
              "median": sorted(search_times)[len(search_times) // 2], "times": search_times}
    return row(report, "insert 100 new keys", insert_times, group=f"insert vs search C={n_keys}", data=insert_times,
               paired=paired, plot="db_scaling", x=n_keys, series="insert 100 new keys", op="vecdb_insert")


def test_insert_target_is_the_per_round_insert_over_search_at_100k(report):
    # Per round insert/search: 2, 2, 9 -> median 2, met (the ratio of the medians, 8, would miss it).
    met = report.database_targets([insert_row(report, 100_000, [2.0, 8.0, 9.0], [1.0, 4.0, 1.0])])
    assert [t.met for t in met if "insert" in t.title] == [True]
    # Per round 2, 8, 8 -> median 8, not met (the ratio of the minima, 2, would call it met).
    missed = report.database_targets([insert_row(report, 100_000, [2.0, 8.0, 8.0], [1.0, 1.0, 1.0])])
    assert [t.met for t in missed if "insert" in t.title] == [False]
    small = report.database_targets([insert_row(report, 10_000, [1.0], [1.0])])
    assert [t.met for t in small if "insert" in t.title] == [None]  # never measured at 100k: no verdict
    assert [t.met for t in small if "save" in t.title or "reload" in t.title] == [None, None]


def test_save_and_load_targets_read_the_100k_rows(report):
    rows = [row(report, "editor.save", [12.0], group="save C=100,000", plot="db_scaling", x=100_000,
                series="save (editor.save)", op="save", bytes=10),
            row(report, "editor.reload", [3.0], group="load C=100,000", plot="db_scaling", x=100_000,
                series="load (editor.reload)", op="load")]
    verdicts = {t.title.split("`")[1]: t.met for t in report.database_targets(rows)}
    assert verdicts == {"editor.save": False, "editor.reload": True}


def test_lifelong_section_gives_the_command_when_a_run_is_missing(report, tmp_path, monkeypatch):
    monkeypatch.setattr(report.lifelong, "LONG_RUN", tmp_path / "absent.json")
    monkeypatch.setattr(report.lifelong, "BANK_MEMORY", tmp_path / "absent.json")
    text = "\n".join(report.lifelong.section())
    assert "*Not run: `python benchmarks/long_run.py`" in text
    assert "*Not run: `python benchmarks/bank_memory.py`" in text
    assert report.lifelong.plot(tmp_path) == []
