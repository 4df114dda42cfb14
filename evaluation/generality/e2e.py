"""End-to-end: real MELO blocks trained and routed, on part B of the split, for several generality variants.

    python evaluation/generality/e2e.py --model minilm --variants melo,para3,proj,proj_para3 \
        --out evaluation/generality/results/e2e_minilm.json
    python evaluation/generality/e2e.py --model smollm2 --limit 150 --variants ... --out ...

The protocol is the harness's (``melo_fast.eval.harness.SequentialEval``: batches of 10, every 5th
record never edited, answers through the routed fast path, the same scores), with three changes:

- generality on generate prompts uses only the held-out ``generate_prompt[3:]`` (``common``), so that
  variants given user paraphrases are scored on wordings they never saw; ``rephrase`` is never given;
- locality is also reported ``clean``: without the questions that ask an edited fact in other words
  (``common.same_fact``);
- routing is reported beside the answers: the share of generate prompts routed to their own block,
  and the generality *among those* (``gen_generate_given_routed``: does the block give the new answer
  once a paraphrase reaches it?).

A variant (``VARIANTS``) says what one edit batch is:

- ``paraphrases`` m: each edit brings ``generate_prompt[:m]`` as extra rows of its batch, with the same
  target: they are trained on and their keys join the database (MELO's own insert merges them into
  the edit's cluster or adds clusters with its label);
- ``prefixes`` k: k extra training rows per row, the row's text behind a random generated prefix
  (``prefixes.py``); training only, their keys are never inserted (the ``open_block(keys) -> train on
  another batch -> commit`` path of the library);
- ``projection``: a trained key projection (``projection.py``) applied to the router's keys, for
  editing and serving alike (the prototype swaps the router's key function);
- ``key_projection``: the shipped :class:`melo_fast.KeyProjection` (``library_projection.py``), passed to
  ``melo_fast.patch`` with the router and key position it was trained on, at the radius it chose on part A;
  its runs are replayed on ``KP_GRID``, absolute radii (its keys are unit vectors, there is no key scale);
- radius: the main run uses the library's default radius (``melo``) or the relative radius the
  routing-bound probe chose on part A for that key function at raw locality >= 0.99 (``--probe``
  JSONs; ``part_A_radius`` records the probe's choice for every floor). The trained blocks do not
  depend on the radius (each block trains with its batch routed to it), so the run is then *replayed*
  on the probe's grid of relative radii (``grid``): the database is rebuilt from the same keys and the
  routed answers re-scored, exactly as a run at that radius would score them (ES aside, which is
  measured in the main run only). The report reads the grid point at part A's radius for each floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import melo_fast  # noqa: E402
from evaluation.generality import common  # noqa: E402
from evaluation.generality.probe import RADII  # noqa: E402
from evaluation.generality.router_keys import use_projection, use_text_keys  # noqa: E402
from melo_fast.config import MeloConfig  # noqa: E402
from melo_fast.editing.training import train_block  # noqa: E402
from melo_fast.editor import build_edit_batch  # noqa: E402
from melo_fast.eval import metrics  # noqa: E402
from melo_fast.eval.harness import SequentialEval, Settings  # noqa: E402
from melo_fast.eval.probes import ProbeSet  # noqa: E402
from melo_fast.vecdb import COINCIDE_FRACTION, VectorDatabase, coinciding_conflicts  # noqa: E402
from melo_fast.vecdb.wordings import wording_radii  # noqa: E402


@dataclass
class Variant:
    name: str
    paraphrases: int = 0
    prefixes: int = 0
    projection: str | None = None  # path of a saved projection
    default_radius: bool = False  # the library's default relative radius (0.1) instead of part A's
    per_edit_blocks: bool = False  # one block per edit instead of one per batch of 10
    text_keys: bool = False  # keys from the prompt's text by MiniLM (+ its projection), not the edited model
    key_projection: bool = False  # the shipped melo_fast.KeyProjection (library_projection.py), at its own radius
    prefix_rows: int = 0  # MeloConfig.prefix_rows: the library's prefixed training copies (with --training default)
    note: str = ""


PROJ = {"minilm": "/tmp/melo_generality/proj_minilm.pt", "smollm2": "/tmp/melo_generality/proj_smollm2.pt"}
KP = {"minilm": "/tmp/melo_generality/kp_minilm.safetensors", "smollm2": "/tmp/melo_generality/kp_smollm2.safetensors"}
# --key-projection-file replaces KP's file (a projection trained on another split).
KP_GRID = [round(0.04 * i, 2) for i in range(4, 21)]  # absolute radii replayed for the shipped projection
VARIANTS = {
    # The shipped key projection (melo_fast.patch(..., key_projection=...)) with the radius it chose on part A.
    "kp": dict(key_projection=True, default_radius=True, note="melo_fast.KeyProjection as shipped"),
    "kp_para1": dict(key_projection=True, default_radius=True, paraphrases=1),
    "kp_para3": dict(key_projection=True, default_radius=True, paraphrases=3),
    "kp_prefix3": dict(key_projection=True, default_radius=True, prefix_rows=3),
    "melo": dict(default_radius=True, note="MELO as shipped (default radius)"),
    "melo_rA": dict(note="MELO, radius chosen on part A"),
    "para1": dict(paraphrases=1),
    "para3": dict(paraphrases=3),
    "prefix": dict(prefixes=3),
    "para3_prefix": dict(paraphrases=3, prefixes=3),
    "proj": dict(projection="PROJ"),
    "proj_para1": dict(projection="PROJ", paraphrases=1),
    "proj_para3": dict(projection="PROJ", paraphrases=3),
    "proj_prefix": dict(projection="PROJ", prefixes=3),
    "proj_para3_prefix": dict(projection="PROJ", paraphrases=3, prefixes=3),
    "proj_single": dict(projection="PROJ", per_edit_blocks=True),
    "proj_para3_single": dict(projection="PROJ", paraphrases=3, per_edit_blocks=True),
    # SmolLM2 routed by MiniLM's keys of the prompt text, through MiniLM's projection (an external key encoder).
    "text_proj": dict(projection="PROJ_MINILM", text_keys=True),
    "text_proj_para3": dict(projection="PROJ_MINILM", text_keys=True, paraphrases=3),
}
FLOORS = ("locality>=0.99", "locality>=0.98", "locality_clean>=0.99", "locality_clean>=0.98")
# The harness's probe sets these experiments use. The harness has since added portability and
# continuation sets (generative tasks): they are left out, so a run answers and reports what it did.
PROBE_SETS = ("edit", "rephrase", "generate", "locality_relation", "locality_unedited")


def melo_loop(config: MeloConfig):
    """How each block trains here: MELO's loop, Adam + StepLR for ``num_iter`` steps, as the library's
    ``edit`` ran it when these experiments were made. The library has since added an early stop
    (``stop_loss``), a frozen-prefix replay and continuation tokens: all off (``train_block`` never adds
    continuation tokens, which only ``edit`` does; 0 records that)."""
    return dataclasses.replace(config.train_settings, stop_loss=None, cache_frozen_prefix=False, continuation_tokens=0)


# --- models --------------------------------------------------------------------------------------------
def build_task(model_name: str, records):
    """The deployed model of a run and its harness adapter, with the MELO config it is edited with."""
    if model_name == "minilm":
        from melo_fast.eval.classifier import build_deployed_model
        from melo_fast.eval.demo import DEMO_CONFIG
        from melo_fast.eval.tasks import ClassifierTask

        model, tokenizer, _ = build_deployed_model(records, seed=common.SEED)
        return ClassifierTask(model, tokenizer, model.answers), DEMO_CONFIG
    from melo_fast.eval.tasks import GenerativeTask

    model, tokenizer = common.load_smollm2()
    return GenerativeTask(model, tokenizer), MeloConfig()


def edit_rows(task, texts: list[str], targets: list[str]) -> dict[str, torch.Tensor]:
    """An edit batch of ``texts -> targets`` for the task's model (the batch the harness would build)."""
    if task.kind == "classifier":
        batch = task.encode(texts)
        batch["labels"] = torch.tensor([task.answer_ids[t] for t in targets], dtype=torch.long)
        return batch
    task.tokenizer.padding_side = "right"
    return build_edit_batch(task.model, texts, targets, task.tokenizer)


# --- the protocol --------------------------------------------------------------------------------------
class GeneralityEval(SequentialEval):
    """The harness with held-out generate prompts, clean locality and routing statistics."""

    training = "melo"  # how blocks train (edit_group); main() sets it from --training

    def _probe_sets(self) -> dict[str, ProbeSet]:
        sets = {name: s for name, s in super()._probe_sets().items() if name in PROBE_SETS}
        targets = [r.target_new for r in self.edited]
        owner = [i for i, r in enumerate(self.edited) for _ in common.heldout_generate(r)]
        expected = [targets[i] for i in owner]
        sets["generate"] = ProbeSet(
            "generate", [g for r in self.edited for g in common.heldout_generate(r)], [[t] for t in expected], owner,
            self.task.token_lengths(expected),
        )
        self.same_fact = {
            "locality_relation": [common.same_fact(r.subject, p.ground_truth, self.edited)
                                  for r in self.edited + self.held for p in common.relation_probes(r)],
            "locality_unedited": [common.same_fact(r.subject, r.ground_truth, self.edited) for r in self.held] * 2,
        }
        return sets

    def scores(self, name: str, answers: list[str]) -> list[float]:
        """The primary score of every answer of a set (references: the edit's target, or the unedited answer)."""
        probe_set = self.sets[name]
        out = []
        for i, answer in enumerate(answers):
            references = probe_set.references[i] if probe_set.references is not None else [
                self.answerer.unedited[name][i]]
            out.append(self.task.score(answer, references)[self.task.primary])
        return out

    def final(self, editor, block_of_record: list[int]) -> dict:
        """End-of-run metrics of the patched model (answers via the routed fast path)."""
        out: dict[str, float] = {}
        per = {name: self.scores(name, self.answerer.routed(name, editor)) for name in self.sets}
        out["err"] = metrics.mean(per["edit"])
        out["gen_rephrase"] = metrics.mean(per["rephrase"])
        out["gen_generate"] = metrics.mean(per["generate"])
        # Routing: which generate prompts reach the block that holds their edit.
        blocks = self.answerer.blocks("generate", editor)
        own = [block_of_record[o] for o in self.sets["generate"].owners]
        reached = [b == e for b, e in zip(blocks, own, strict=True)]
        out["generate_routed_own"] = metrics.mean([float(x) for x in reached])
        out["generate_misrouted"] = metrics.mean([float(b >= 0 and b != e) for b, e in zip(blocks, own, strict=True)])
        out["gen_generate_given_routed"] = metrics.mean([s for s, x in zip(per["generate"], reached, strict=True) if x])
        rblocks = self.answerer.blocks("rephrase", editor)
        out["rephrase_routed_own"] = metrics.mean([float(b == block_of_record[i]) for i, b in enumerate(rblocks)])
        totals = {"raw": [0.0, 0], "clean": [0.0, 0]}
        for name, short in (("locality_relation", "loc_relation"), ("locality_unedited", "loc_unedited")):
            values, same = per[name], self.same_fact[name]
            clean = [v for v, s in zip(values, same, strict=True) if not s]
            out[short] = metrics.mean(values)
            out[f"{short}_clean"] = metrics.mean(clean)
            out[f"{short}_same_fact_kept"] = metrics.mean([v for v, s in zip(values, same, strict=True) if s])
            totals["raw"][0] += sum(values)
            totals["raw"][1] += len(values)
            totals["clean"][0] += sum(clean)
            totals["clean"][1] += len(clean)
        out["locality"] = totals["raw"][0] / max(1, totals["raw"][1])
        out["locality_clean"] = totals["clean"][0] / max(1, totals["clean"][1])
        return out

    def run_variant(self, config: MeloConfig, variant: Variant, prefixes: list[str], radius: float | None,
                    grid: list[float]) -> dict:
        """Edit part B's batches with ``variant`` at relative radius ``radius`` (None: the config's), score,
        then replay the routing at each relative radius of ``grid`` (ascending; it stops once clean locality
        is below 0.9)."""
        if not self.answerer.unedited:
            self.answerer.compute_unedited()
        if radius is not None:
            config = config.replace(init_radius="auto", relative_radius=radius)
        if variant.prefix_rows:
            config = config.replace(prefix_rows=variant.prefix_rows)
        key_projection = None
        if variant.key_projection:
            key_projection = melo_fast.KeyProjection.load(variant.projection)
            config = config.replace(router=key_projection.router, key_position=key_projection.key_position)
        elif variant.projection and not variant.text_keys:
            # The projection was trained on one key function (module, layer, position): route with it.
            from evaluation.generality.projection import load_projection

            module, layer, position = common.parse_spec(load_projection(variant.projection)[1])
            model_name = "minilm" if self.task.kind == "classifier" else "smollm2"
            config = config.replace(router=common.MODULES[model_name][module].format(L=layer), key_position=position)
        # The answerer caches keys per router and key position; projected keys are another key function.
        caches = self.__dict__.setdefault("_key_caches", {})
        self.answerer._keys = caches.setdefault(variant.projection, {})
        torch.manual_seed(common.SEED)
        editor = melo_fast.patch(self.task.model, config, tokenizer=self.task.tokenizer, key_projection=key_projection)
        if variant.text_keys:
            use_text_keys(editor, self.task.tokenizer, variant.projection)
        elif variant.projection and not variant.key_projection:
            use_projection(editor, variant.projection)
        editor.calibrate(self.task.tokenizer)
        rng = random.Random(common.SEED)
        es, edit_seconds, edit_cpu, dropped, rows_trained = [], 0.0, 0.0, 0, 0
        block_of_record: list[int] = []
        inserts = []  # (keys, labels, block) of every commit, for the replays
        try:
            for b, records in enumerate(self.batches):
                groups = [[r] for r in records] if variant.per_edit_blocks else [records]
                for group in groups:
                    start, cpu = time.perf_counter(), time.process_time()
                    block, n_dropped, n_rows, keys, labels, paraphrase_of = edit_group(
                        editor, self.task, group, variant, prefixes, rng, self.training)
                    edit_seconds += time.perf_counter() - start
                    edit_cpu += time.process_time() - cpu  # one thread: CPU time, not the shared machine's waits
                    dropped += n_dropped
                    rows_trained += n_rows
                    block_of_record += [block] * len(group)
                    inserts.append((keys, labels, block, paraphrase_of))
                indices = self._batch_indices(b)
                answers = self.answerer.routed("edit", editor, indices)  # ES: the batch right after its edit
                es += [self.task.score(a, self.sets["edit"].references[i])[self.task.primary]
                       for i, a in zip(indices, answers, strict=True)]
            start = time.perf_counter()
            out = {"es": metrics.mean(es), **self.final(editor, block_of_record)}
            out.update(edit_seconds=edit_seconds, edit_cpu_seconds=edit_cpu, eval_seconds=time.perf_counter() - start,
                       edits=len(self.edited), rows_trained=rows_trained, rows_dropped=dropped,
                       init_radius=editor.db.init_radius, key_scale=editor.db.key_scale,
                       relative_radius=config.relative_radius, conflict_rule=editor.db.conflict_rule,
                       db=editor.db.stats(), blocks=editor.num_blocks)
            out["grid"] = []
            blocks = editor.blocks()
            # A key projection's keys have no key scale: its grid is of absolute radii (unit keys).
            for relative in grid:
                radius_here = relative * editor.db.key_scale if editor.db.key_scale is not None else relative
                db = VectorDatabase(editor.db.dim, radius_here, key_scale=editor.db.key_scale,
                                    conflict_rule=editor.db.conflict_rule)
                for keys, labels, block, paraphrase_of in inserts:
                    radii = None
                    if paraphrase_of is not None:  # the projection's paraphrase radii, scaled like its radius
                        projection = editor.state.projection
                        scale = radius_here / projection.radius
                        radii = wording_radii(paraphrase_of, lambda k, s=scale, p=projection: s * p.radius_for(k))
                    drop = {j for _, j in coinciding_conflicts(keys, labels, COINCIDE_FRACTION * db.init_radius)}
                    keep = [i for i in range(len(labels)) if i not in drop]
                    db.insert(keys[keep], [labels[i] for i in keep], block,
                              radii=None if radii is None else [radii[i] for i in keep])
                editor.replace_state(db, blocks, editor.state.projection)
                point = {"relative_radius": relative, **self.final(editor, block_of_record), **db.stats()}
                out["grid"].append({k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()})
                if point["locality_clean"] < 0.9:
                    break
            out["oracle_routing"] = self.oracle(editor, blocks, block_of_record)
        finally:
            melo_fast.unpatch(self.task.model)
        return out


    def oracle(self, editor, blocks, block_of_record: list[int]) -> dict:
        """Generality when every paraphrase is routed to its own edit's block (a perfect router).

        Measures the other half of generality: does a block give the new answer to a wording it was not
        trained on, once that wording reaches it? A database whose points are the paraphrases' own keys
        (a tiny radius, one label per question) routes each of them to its block and nothing else.
        """
        scale = editor.db.key_scale
        db = VectorDatabase(editor.db.dim, 1e-4 * (scale or 1.0), key_scale=scale)  # a projection's keys: unit
        owners = {"rephrase": list(range(len(self.edited))), "generate": self.sets["generate"].owners}
        per_block: dict[int, list] = {}
        for kind, (name, own) in enumerate(owners.items()):
            keys = self.answerer.keys(name, editor)
            for i, owner in enumerate(own):
                per_block.setdefault(block_of_record[owner], []).append((keys[i], (kind, i)))  # one label each
        for block in sorted(per_block):
            keys = torch.stack([k for k, _ in per_block[block]])
            labels = [label for _, label in per_block[block]]
            drop = {j for _, j in coinciding_conflicts(keys, labels, COINCIDE_FRACTION * db.init_radius)}
            keep = [i for i in range(len(labels)) if i not in drop]
            db.insert(keys[keep], [labels[i] for i in keep], block)
        editor.replace_state(db, blocks, editor.state.projection)
        return {
            "gen_rephrase": metrics.mean(self.scores("rephrase", self.answerer.routed("rephrase", editor))),
            "gen_generate": metrics.mean(self.scores("generate", self.answerer.routed("generate", editor))),
        }


def edit_texts(records, paraphrases: int) -> tuple[list[str], list[str], list[int]]:
    """The rows of one edit batch: each record's prompt and its first ``paraphrases`` user paraphrases, with
    their targets and, per row, the index of its record in ``records``."""
    texts, targets, record_of = [], [], []
    for k, r in enumerate(records):
        for text in [r.prompt, *common.given_paraphrases(r, paraphrases)]:
            texts.append(text)
            targets.append(r.target_new)
            record_of.append(k)
    return texts, targets, record_of


def edit_group(editor, task, records, variant: Variant, prefixes: list[str], rng: random.Random,
               training: str = "melo"):
    """Edit ``records`` as one block: key rows (prompt + m paraphrases) and training rows (+ prefixed copies).

    ``training``: ``"melo"``, MELO's fixed loop (:func:`melo_loop`); ``"default"``, ``editor.edit`` as shipped
    (early stop, frozen-prefix replay, continuation tokens; not with prefixes).

    Returns ``(block id, rows dropped, rows trained, keys inserted, their labels, paraphrase_of or None)``.
    """
    texts, targets, record_of = edit_texts(records, variant.paraphrases)
    # The editor refuses two rows that coincide with different targets: keep the first (as a user would).
    tolerance = COINCIDE_FRACTION * editor.db.init_radius
    key_batch = edit_rows(task, texts, targets)
    keys, labels = editor.keys(key_batch), editor.edit_batch(key_batch).targets
    drop = {j for _, j in coinciding_conflicts(keys, labels, tolerance)}
    if drop:
        texts = [t for i, t in enumerate(texts) if i not in drop]
        targets = [t for i, t in enumerate(targets) if i not in drop]
        record_of = [k for i, k in enumerate(record_of) if i not in drop]
        key_batch = edit_rows(task, texts, targets)
        keys, labels = editor.keys(key_batch), editor.edit_batch(key_batch).targets
    # With the shipped projection, a record's rows are one edit in several wordings, as edit_texts(...,
    # paraphrases=...) makes them (its first row left is the prompt: their keys get the projection's
    # paraphrase radius); the research variants keep every row an edit of its own, as they were measured.
    paraphrase_of = None
    if variant.key_projection and variant.paraphrases:
        paraphrase_of = [record_of.index(k) for k in record_of]
    if training == "default" and not variant.prefixes:
        block = editor.edit(key_batch, paraphrase_of=paraphrase_of).block_id
        return block, len(drop), len(texts), keys, labels, paraphrase_of
    train_texts, train_targets = list(texts), list(targets)
    for text, target in zip(texts, targets, strict=True):
        for prefix in rng.sample(prefixes, variant.prefixes) if variant.prefixes else []:
            train_texts.append(f"{prefix} {text}")
            train_targets.append(target)
    train_batch = edit_rows(task, train_texts, train_targets) if len(train_texts) > len(texts) else key_batch
    settings = melo_loop(editor.config)
    model = editor.model
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # the keys inserted at commit: prompt + paraphrases only
            parameters = editor.open_block(key_batch, paraphrase_of=paraphrase_of)
            try:
                train_block(model, train_batch, parameters, settings)  # MELO's loop on all training rows
                block, _ = editor.commit()
            except BaseException:
                if editor.block_is_open:
                    editor.abort()
                raise
    finally:
        model.train(was_training)
    return block, len(drop), len(train_texts), keys, labels, paraphrase_of


def radius_from_probe(probe_json: dict, spec: str, projection: bool, paraphrases: int, floor: str) -> float | None:
    """The relative radius the probe chose on part A for this key function (cosine keys, ``floor``)."""
    # Without a projection the library compares raw keys (Euclidean); a projection's keys are unit vectors.
    metric = "cos" if projection else "l2"
    for result in probe_json["results"]:
        if (result["spec"], result["metric"], result["projection"], result["paraphrases"]) == (
                spec, metric, projection, paraphrases):
            best = result["A"]["summary"][floor]["best"]
            return None if best is None else best["relative_radius"]
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "minilm"), required=True)
    parser.add_argument("--variants", required=True, help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--limit", type=int, default=None, help="use the first N records of part B")
    parser.add_argument("--probe", action="append", default=[],
                        help="probe/projection JSON(s) giving part A's radius per key function")
    parser.add_argument("--floor", default="locality>=0.99", help="which summary of the probe picks the radius")
    parser.add_argument("--grid-from", type=float, default=0.05, help="smallest relative radius replayed")
    parser.add_argument("--grid", choices=("full", "picks"), default="full",
                        help="replay every radius of the probe's grid, or only part A's picks (cheaper: generation)")
    parser.add_argument("--prefixes", default=str(common.RESULTS / "prefixes_smollm2.json"))
    parser.add_argument("--training", choices=("melo", "default"), default="melo",
                        help="how blocks train: MELO's fixed loop, or editor.edit as shipped (early stop, "
                             "continuation)")
    parser.add_argument("--key-projection-file", default=None, help="the shipped projection of the kp variants")
    parser.add_argument("--split-seed", type=int, default=common.SEED,
                        help="seed of the by-subject split into parts A and B (another seed: another split)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start_all = time.perf_counter()
    records = common.load_parts(seed=args.split_seed)["B"]
    if args.limit:
        records = records[: args.limit]
    task, config = build_task(args.model, records)
    harness = GeneralityEval(task, records, Settings(batch_size=10, holdout=common.HOLDOUT, progress=False))
    harness.training = args.training
    prefixes = json.loads(Path(args.prefixes).read_text())["prefixes"] if Path(args.prefixes).exists() else []
    probes = [json.loads(Path(p).read_text()) for p in args.probe]
    spec = f"{common.DEFAULT_ROUTER[args.model]}:last"
    start = time.perf_counter()
    harness.answerer.compute_unedited()
    unedited_seconds = time.perf_counter() - start
    report = {
        "script": "evaluation/generality/e2e.py",
        "command": "python evaluation/generality/e2e.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "provenance": common.provenance(),
        "model": args.model,
        "config": config.to_dict(),
        # what trains the blocks: melo_loop, or editor.edit with the config's own settings
        "block_training": dataclasses.asdict(melo_loop(config) if args.training == "melo" else config.train_settings),
        "training": args.training,
        "part": "B",
        "shape": {**harness.describe(), "same_fact": {k: sum(v) for k, v in harness.same_fact.items()}},
        "unedited_answers_seconds": unedited_seconds,
        "variants": {},
    }
    out = Path(args.out)
    for name in args.variants.split(","):
        fields = dict(VARIANTS[name])
        if fields.get("projection") == "PROJ":
            fields["projection"] = PROJ[args.model]
        if fields.get("projection") == "PROJ_MINILM":
            fields["projection"] = PROJ["minilm"]
        if fields.get("key_projection"):
            fields["projection"] = args.key_projection_file or KP[args.model]
        variant = Variant(name=name, **fields)
        key_spec = spec
        if variant.projection and not variant.key_projection:
            from evaluation.generality.projection import load_projection

            key_spec = load_projection(variant.projection)[1]
        picks = {}  # per locality floor, the relative radius the probe chose on part A for this key function
        for floor in FLOORS:
            for probe_json in probes:
                found = radius_from_probe(probe_json, key_spec, variant.projection is not None, variant.paraphrases,
                                          floor)
                if found is not None:
                    picks[floor] = found
                    break
        if variant.default_radius:
            radius = None
        elif args.floor in picks:
            radius = picks[args.floor]
        else:
            print(f"{name}: no part-A radius for it in the probe JSONs given; skipped")
            continue
        if variant.prefixes and not prefixes:
            print(f"{name}: no prefixes file {args.prefixes}; skipped")
            continue
        print(f"== {name}: relative radius {radius}, part A's radii {picks}", flush=True)
        grid = [r for r in RADII if r >= args.grid_from] if args.grid == "full" else sorted(set(picks.values()))
        if variant.key_projection:
            grid = KP_GRID if args.grid == "full" else []  # absolute radii on unit keys
        result = harness.run_variant(config, variant, prefixes, radius, grid)
        result["part_A_radius"] = picks
        result["variant"] = asdict(variant)
        report["variants"][name] = result
        shown = {k: v for k, v in result.items() if isinstance(v, float) and not math.isnan(v)}
        print("   " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()), flush=True)
        report["total_seconds"] = time.perf_counter() - start_all
        common.write_json(out, report)  # after every variant: a long run keeps what it has


if __name__ == "__main__":
    main()
