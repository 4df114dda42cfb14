"""EVALUATION.md's generator (evaluation/report.py): figures come from the reports, or are declared missing."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED_DEMO = ROOT / "evaluation" / "runs" / "demo" / "demo_report.json"


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("evaluation_report", ROOT / "evaluation" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def generate(generator, tmp_path) -> str:
    generator.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "EVALUATION.md"),
                    "--plots", str(tmp_path / "docs")])
    return (tmp_path / "EVALUATION.md").read_text()


def test_missing_reports_render_their_commands_and_no_figures(generator, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "dev_sweep.png").write_bytes(b"an old picture")
    text = generate(generator, tmp_path)
    for run in generator.RUNS.values():
        assert f"not yet run: `{run.command}`" in text
    assert "| MELO |" not in text and "![" not in text and "Database after" not in text
    assert not (tmp_path / "docs" / "dev_sweep.png").exists()  # a picture of a report that is not there
    assert "python -m melo_fast demo --model minilm --threads 1 --out evaluation/runs/demo" in text
    assert "python -m melo_fast demo --threads 1 --out evaluation/runs/smollm2_demo" in text


def test_present_report_gives_the_figures_and_a_stale_one_none(generator, tmp_path):
    report = json.loads(COMMITTED_DEMO.read_text())
    for name in ("demo", "demo_scale_20"):  # the same report under a run whose command differs
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(COMMITTED_DEMO, tmp_path / "runs" / name / "demo_report.json")
    text = generate(generator, tmp_path)
    melo = report["methods"]["melo"]["metrics"]
    # A report made before --model existed is a MiniLM run, and arguments added since take their defaults.
    assert "model" not in report["arguments"] and "chat" not in report["arguments"]
    columns = generator.present_columns(report["methods"])
    assert [key for key, _ in columns] == [key for key, _ in generator.TABLE_COLUMNS if key in melo]
    row = "| MELO | " + " | ".join(f"{melo[key]:.3f}" for key, _ in columns) + " |"
    assert row in text
    assert f"{report['total_seconds']:.0f} s" in text
    assert (tmp_path / "docs" / "demo_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "](docs/demo_curves.png)" in text
    # demo_scale_20's command sets --scale 20 and MELO only: the demo's report must not pass for it.
    assert "stale (runs/demo_scale_20/demo_report.json was made with methods 'unedited,melo,lora' instead of " \
           "'unedited,melo', scale None instead of 20.0); rerun" in text
    assert "scale 20: ES" not in text


def test_llm_reports_give_both_metric_families_and_the_portability_kinds(generator, tmp_path):
    from melo_fast.cli import build_parser
    from melo_fast.eval.arguments import recorded_arguments

    demo = json.loads((ROOT / "evaluation" / "runs" / "smollm2_demo" / "demo_report.json").read_text())
    dev = json.loads(json.dumps(demo))  # a dev-shaped report: the same, with portability questions
    dev["arguments"] = recorded_arguments(build_parser().parse_args(generator.RUNS["smollm2_dev"].argv))
    dev["probe_questions"].update(portability_reasoning=14, portability_subject_aliasing=10)
    for i, result in enumerate(dev["methods"].values()):
        result["metrics"].update(portability_reasoning=0.1 * i, portability_acc_reasoning=0.25,
                                 portability_subject_aliasing=0.5, portability_acc_subject_aliasing=0.125 * i)
    for name, report in (("smollm2_demo", demo), ("smollm2_dev", dev)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "demo_report.json").write_text(json.dumps(report))
    text = generate(generator, tmp_path)
    assert "| method | reasoning (14 questions) | subject_aliasing (10 questions) |" in text
    assert "| MELO | 0.100 / 0.250 | 0.500 / 0.125 |" in text
    melo = demo["methods"]["melo"]["metrics"]
    assert f"| MELO | {melo['rewrite_acc_at_edit']:.3f} | {melo['rewrite_acc']:.3f} | {melo['rephrase_acc']:.3f} |" \
        in text
    assert f"{melo['target_repetition']:.3f}" in text
    assert "not yet run: `python -m melo_fast demo --chat" in text


GENERALITY_RESULTS = ROOT / "evaluation" / "generality" / "results"


def test_generality_section_reads_the_committed_results(generator):
    text = "\n".join(generator.generality())
    assert text.startswith("## Edits that reach their paraphrases (issue 22)")
    probe = json.loads((GENERALITY_RESULTS / "probe_minilm_paraphrases.json").read_text())
    router = next(r for r in probe["results"] if r["key_function"] == "attn@5:last/l2" and r["paraphrases"] == 0)
    assert f"| minilm | `attn@5:last/l2` | 0 | {router['B']['nn_generate']:.2f} |" in text
    melo = json.loads((GENERALITY_RESULTS / "e2e_minilm.json").read_text())["variants"]["melo"]
    assert f"{melo['gen_generate']:.2f} / {melo['gen_rephrase']:.2f} (locality {melo['locality']:.3f})" in text
    assert "edit_texts(..., paraphrases=" in text and "evaluation/generality/REPORT.md" in text
    for label, folder in (("before the floor", "split1/before_floor"), ("with the floor", "split1")):
        trained = json.loads((GENERALITY_RESULTS / folder / "library_projection_minilm.json").read_text())
        run = json.loads((GENERALITY_RESULTS / folder / "e2e_minilm_wordings.json").read_text())["variants"]["kp_para3"]
        assert (f"{label}: radius for 3 paraphrases {trained['training']['held_out_paraphrased']['3']['radius']:.2f}"
                in text and f"on B generality {run['gen_generate']:.2f} / {run['gen_rephrase']:.2f}" in text)
    # The conflict rule: routing alone under each rule at the radii chosen under it, and the voronoi runs end to end.
    routing = json.loads((GENERALITY_RESULTS / "voronoi" / "conflict_rules_smollm2.json").read_text())
    for rule in ("split", "voronoi"):
        point = routing["results"][rule]["3"]["calibrated"][rule]
        assert (f"| projection + 3 paraphrases | {rule} | {point['radius_for']['3']:.2f} ({rule}) | "
                f"{point['generate_routed_own']:.3f} | {point['generate_misrouted']:.3f} |") in text
    voronoi_run = json.loads((GENERALITY_RESULTS / "voronoi" / "e2e_minilm_wordings.json").read_text())["variants"]
    trained = json.loads((GENERALITY_RESULTS / "voronoi" / "library_projection_minilm.json").read_text())
    radius, v = trained["training"]["held_out_paraphrased"]["3"]["radius"], voronoi_run["kp_para3"]
    assert (f"| minilm | first | all | projection + 3 paraphrases | voronoi | {radius:.2f} | {v['edits']} | "
            f"{v['err']:.3f} | {v['gen_generate']:.2f} / {v['gen_rephrase']:.2f} |") in text
    # What stopped each radius on A, and why the target is read on clean locality (from the runs' counts).
    stopped = json.loads((GENERALITY_RESULTS / "voronoi" / "library_projection_smollm2.json").read_text())
    stopped = stopped["training"]["held_out"]["stopped_by"]
    first = stopped["questions"][0]
    assert (f"- SmolLM2, first split: radius {stopped['radius'] - 0.02:.2f}; at {stopped['radius']:.2f}" in text
            and f"“{first['question']}” taken for “{first['nearest_edit_wording']}” ({first['distance']:.2f})" in text)
    shapes = [json.loads(run.read_text())["shape"] for run in (GENERALITY_RESULTS / "voronoi").rglob("e2e_*.json")]
    share = min(sum(s["same_fact"].values()) / (s["probe_questions"]["locality_relation"]
                                                + s["probe_questions"]["locality_unedited"]) for s in shapes)
    assert "the target is read on clean locality" in text and f"({share:.1%} or more in every split)" in text
    # Number negatives: the projection trained with them, its radii chosen on A and where B's questions go there,
    # in the row that follows the voronoi projection's.
    trained = json.loads((GENERALITY_RESULTS / "numbers" / "library_projection_smollm2.json").read_text())
    routing = json.loads((GENERALITY_RESULTS / "numbers" / "conflict_rules_smollm2.json").read_text())
    on_b = [routing["results"]["voronoi"][m]["calibrated"]["voronoi"]["generate_routed_own"] for m in ("0", "3")]
    worded = trained["training"]["held_out_paraphrased"]["3"]
    row = (f"| smollm2 | first | `{trained['router']}` (mean) | + number negatives | {trained['radius']:.2f}; "
           f"{worded['radius']:.2f} |")
    assert row in text and f"| {on_b[0]:.3f} / {on_b[1]:.3f} |" in text.split(row)[1].splitlines()[0]
    before = "| smollm2 | first | `model.layers.3.mlp.up_proj` (mean) | the facts' own negatives"
    assert text.index(before) < text.index(row)
    # Both halves: each calibration's radii and the held-out questions that judged them, edited half first.
    rows = []
    for folder, judged_on in (("numbers", "the edited half"), ("halves", "both halves")):
        trained = json.loads((GENERALITY_RESULTS / folder / "split1" / "library_projection_minilm.json").read_text())
        questions = trained["training"]["held_out"]["questions"]
        worded = trained["training"]["held_out_paraphrased"]["3"]
        rows.append(f"| minilm | second | `{trained['router']}` (last) | {judged_on} | {trained['radius']:.2f}; "
                    f"{worded['radius']:.2f} | {questions['negatives_many_edits']} / "
                    f"{questions['never_edited_many_edits']} |")
        assert rows[-1] in text
    assert text.index(rows[0]) < text.index(rows[1])
    # The target, on the both-halves runs, and on the number-negative run where both halves chose its radius again.
    for relative, split, label in (("halves/split1/e2e_minilm_wordings.json", "MiniLM second", "kp_para3"),
                                   ("numbers/all_b/e2e_smollm2_wordings.json", "SmolLM2 first", "kp_para3")):
        v = json.loads((GENERALITY_RESULTS / relative).read_text())["variants"][label]
        met = min(v["gen_generate"], v["gen_rephrase"]) >= 0.6 and v["locality_clean"] >= 0.98
        assert (f"{split} split (all of B), projection + 3 paraphrases: {v['gen_generate']:.2f} / "
                f"{v['gen_rephrase']:.2f} at clean locality {v['locality_clean']:.3f} (raw {v['locality']:.3f}), "
                f"{'met' if met else 'missed'}") in text


def test_generality_section_without_results_says_not_run(generator, tmp_path, monkeypatch):
    import re

    monkeypatch.setattr(generator.generality_report, "RESULTS", tmp_path)
    text = "\n".join(generator.generality())
    assert "| minilm | (not run: " in text and "| smollm2 | (not run: " in text
    assert "MiniLM: not run" in text and "SmolLM2: not run" in text
    assert "(not run)" in text and not re.search(r"\d\.\d\d / \d\.\d\d", text)  # no figure anywhere
