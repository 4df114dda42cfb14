"""The "Targets" section of ``BENCHMARKS.md``: each target's verdict (met / not met / not measured) from the
rows, with the measured figures and, where one is missed, why, worded from the same rows."""

from __future__ import annotations

import math
import statistics
from collections import OrderedDict

from benchmarks.report_rows import LINEAR_CASE, Row, curve, fmt_bytes, fmt_ratio, fmt_time

TARGET_LOOKUP_RATIO = 100.0
TARGET_LINEAR_SLOPE = 1.2
TARGET_LAYER_MIXED = 10.0
TARGET_LAYER_SINGLE = 1.1
TARGET_E2E = 0.95
TARGET_EDIT = 1.5
TARGET_INSERT_OVER_SEARCH = 3.0  # issue 13: inserting 100 keys into 100k costs at most 3x searching them
TARGET_INSERT_AT = 100_000
TARGET_PERSIST_SECONDS = 10.0  # "a 100k-key editor saves and loads in seconds"



class Target:
    def __init__(self, title: str, measured: str, met: bool | None, why: str = ""):
        self.title, self.measured, self.met, self.why = title, measured, met, why

    @property
    def verdict(self) -> str:
        return {True: "**met**", False: "**not met**", None: "not measured"}[self.met]


def _cpu(row: Row) -> bool:
    return row.get("device_type", "cpu") == "cpu" and "cuda" not in row.group


def lookup_targets(rows: list[Row]) -> list[Target]:
    targets = []
    by_q: list[tuple[int, float]] = []
    lookups = [r for r in rows if r.get("op") == "vecdb_search" and r.get("C") == 10_000 and _cpu(r)]
    by_query: OrderedDict[tuple, list[Row]] = OrderedDict()
    for row in lookups:
        by_query.setdefault((row.get("Q"), row.get("d"), row.group), []).append(row)
    for (q, d, group), members in sorted(by_query.items(), key=lambda item: (item[0][0], item[0][2])):
        ref = next((r for r in members if r.backend == "reference"), None)
        fast = [r for r in members if r.backend not in ("reference", None)]
        title = f"Lookup at 10k keys, Q={q}, d={d}: fastest CPU backend ≥ {TARGET_LOOKUP_RATIO:.0f}× `reference`"
        if ref is None or not fast:
            targets.append(Target(title + f" (group `{group}`)", "reference or fast backend missing", None))
            continue
        best = min(fast, key=lambda r: r.time)
        ratio = ref.time / best.time
        by_q.append((q, ratio))
        met = ratio >= TARGET_LOOKUP_RATIO
        per_pair = ref.time / (q * 10_000)
        bandwidth = 10_000 * d * 4 / best.time / 1e9
        why = "" if met else (
            f"At Q={q} the reference loop does Q×C = {q * 10_000:,} distance evaluations "
            f"({per_pair * 1e6:.1f} µs each, {fmt_time(ref.time)} in all); `{best.backend}` reads the "
            f"{10_000 * d * 4 / 1e6:.0f} MB of centers in {fmt_time(best.time)} ({bandwidth:.1f} GB/s)."
        )
        targets.append(Target(title + f" (group `{group}`)",
                              f"{fmt_ratio(ratio)} (`{best.backend}` {fmt_time(best.time)} vs reference "
                              f"{fmt_time(ref.time)})", met, why))
    if len(by_q) > 1:  # how the ratio changes with Q, from the rows themselves
        across = "; ".join(f"Q={q}: {fmt_ratio(r)}" for q, r in sorted(by_q))
        for target in targets:
            if target.met is False:
                target.why += f" The ratio by number of queries: {across}."
    return targets

def linear_targets(rows: list[Row]) -> list[Target]:
    series = curve(rows, "lookup_vs_keys")
    targets = []
    for name, points in series.items():
        if name.startswith("reference"):
            continue
        xs = [x for x, _ in points]
        title = f"Lookup curve `{name}` linear in C up to 1M keys without running out of memory"
        if 1_000_000 not in xs:  # skipped, failed, out of memory or not run: no verdict either way
            targets.append(Target(title, "not measured: " + (f"largest C measured {int(max(xs)):,}" if xs else
                                                             "no points"), None))
            continue
        t_top = next(r.time for x, r in points if x == 1_000_000)
        lower = [(x, r) for x, r in points if x < 1_000_000]
        x_low, r_low = max(lower, key=lambda p: p[0])
        slope = math.log(t_top / r_low.time) / math.log(1_000_000 / x_low)
        met = slope <= TARGET_LINEAR_SLOPE
        peak = next((r.get("process_peak_rss_bytes") for x, r in points if x == 1_000_000), None)
        measured = (f"log-log slope {slope:.2f} from {int(x_low):,} to 1M keys; "
                    f"{t_top / 1e6 * 1e9:.2f} ns per key at 1M ({fmt_time(t_top)}); process peak RSS {fmt_bytes(peak)}")
        why = ""
        if not met:
            why = (f"Time per key grows from {r_low.time / x_low * 1e9:.0f} ns at {int(x_low):,} keys to "
                   f"{t_top / 1e6 * 1e9:.0f} ns at 1M (it completed at 1M without running out of memory).")
        targets.append(Target(title, measured, met, why))
    return targets


def layer_targets(rows: list[Row]) -> list[Target]:
    targets = []
    layer = [r for r in rows if r.get("op") == "layer"]
    for distinct, peft_mode in ((64, "per-sample"), (1, "single")):
        members = [r for r in layer if r.get("distinct") == distinct]
        melo = next((r for r in members if r.get("default_backend")), None)
        peft = next((r for r in members if r.get("peft_mode") == peft_mode), None)
        linear = next((r for r in members if r.case == LINEAR_CASE), None)
        if distinct == 64:
            title = f"Layer, 64 distinct blocks: ≥ {TARGET_LAYER_MIXED:.0f}× faster than PEFT per-sample adapters"
        else:
            title = f"Layer, 1 block: within {TARGET_LAYER_SINGLE}× of PEFT with a single adapter"
        if melo is None or peft is None:
            targets.append(Target(title, "not measured (PEFT or melo_fast case missing)", None))
            continue
        addon = ""
        addon_ratio = None
        if linear is not None and peft.time > linear.time and melo.time > linear.time:
            addon_ratio = (peft.time - linear.time) / (melo.time - linear.time)
            addon = (f"; LoRA add-on alone (time − nn.Linear): PEFT {fmt_time(peft.time - linear.time)}, "
                     f"melo_fast {fmt_time(melo.time - linear.time)} → {fmt_ratio(addon_ratio)}")
        if distinct == 64:
            ratio = peft.time / melo.time
            met = ratio >= TARGET_LAYER_MIXED
            measured = (f"{fmt_ratio(ratio)} (melo_fast `{melo.backend}` {fmt_time(melo.time)}, "
                        f"PEFT {fmt_time(peft.time)}){addon}")
            why = ""
            if not met and linear is not None:
                ceiling = peft.time / linear.time
                tokens = (melo.get("N") or 0) * (melo.get("T") or 0)
                why = (f"Both layers first run the same frozen {melo.get('d_in')}→{melo.get('d_out')} nn.Linear over "
                       f"{tokens:,} tokens ({fmt_time(linear.time)} alone, {100 * linear.time / peft.time:.0f}% of "
                       f"PEFT's time), so a layer with a free LoRA add-on would be {fmt_ratio(ceiling)} faster than "
                       f"PEFT in this run" + (f", short of {TARGET_LAYER_MIXED:.0f}×." if ceiling < TARGET_LAYER_MIXED
                                              else "."))
                if addon_ratio is not None:
                    why += (f" On the LoRA parts alone (time − nn.Linear) melo_fast is {fmt_ratio(addon_ratio)} faster "
                            f"than PEFT's loop over the adapters ({fmt_time((peft.time - linear.time) / distinct)} "
                            "per adapter).")
        else:
            ratio = melo.time / peft.time
            met = ratio <= TARGET_LAYER_SINGLE
            measured = (f"melo_fast/PEFT time = {ratio:.3f} (melo_fast `{melo.backend}` {fmt_time(melo.time)}, "
                        f"PEFT {fmt_time(peft.time)}){addon}")
            why = "" if met else "see the layer tables."
        targets.append(Target(title, measured, met, why))
    return targets


def e2e_targets(rows: list[Row]) -> list[Target]:
    targets = []
    forward = [r for r in rows if r.get("plot") == "e2e_forward"]
    for model in OrderedDict.fromkeys(r.get("model") for r in forward):
        members = [r for r in forward if r.get("model") == model]
        base = next((r for r in members if r.get("edits") is None), None)
        top = next((r for r in members if r.get("edits") == 10_000), None)
        zero = next((r for r in members if r.get("edits") == 0), None)
        title = f"End to end, {model}: patched with 10k edits ≥ {TARGET_E2E}× unpatched throughput"
        if top is None or (base is None and top.paired_ratio is None):
            targets.append(Target(title, "not measured", None))
            continue
        # The verdict uses the interleaved pair when there is one: rows measured a minute apart on a
        # shared machine drift by more than the 5% margin being tested.
        rows_ratio = None if base is None else base.time / top.time
        ratio = top.paired_ratio if top.paired_ratio is not None else rows_ratio
        met = ratio >= TARGET_E2E
        tokens = top.get("tokens") or 0
        spread = top.pair_ratios
        parts = [f"{ratio:.3f}" + (f" interleaved (median of {len(spread)} paired rounds, range "
                                   f"{spread[0]:.3f}–{spread[-1]:.3f})" if spread else
                                   " interleaved" if top.paired_ratio is not None else "")]
        if rows_ratio is not None:
            parts.append(f"separate rows: {rows_ratio:.3f} ({tokens / top.time:,.0f} vs {tokens / base.time:,.0f} "
                         "tokens/s)")
        if zero is not None and zero.paired_ratio is not None:
            parts.append(f"0 edits interleaved: {zero.paired_ratio:.3f}")
        why = ""
        if not met:
            overhead = top.time - top.time * ratio
            why = (f"With every sample hitting an edit, the patched model spends {fmt_time(overhead)} more per batch "
                   f"of {tokens} tokens: one lookup of {top.get('shapes', {}).get('input_ids', ['?'])[0]} keys "
                   f"among 10k stored keys of the router's width and the block LoRA on every token of the "
                   f"{len(top.get('targets') or [])} target layers.")
            if spread and spread[-1] >= TARGET_E2E:
                why += f" Single paired rounds ranged {spread[0]:.3f}–{spread[-1]:.3f}, on both sides of the target."
            if zero is not None and zero.paired_ratio is not None and abs(zero.paired_ratio - 1) > 1 - TARGET_E2E:
                why += (f" The patched-with-0-edits row (no lookup, no LoRA) is itself {zero.paired_ratio:.3f} of "
                        "unpatched, as far from 1 as the margin tested.")
        targets.append(Target(title, "; ".join(parts), met, why))
    return targets


def database_targets(rows: list[Row]) -> list[Target]:
    """Insert vs search at 100k stored keys (interleaved, median of per-round ratios); save and load at 100k."""
    targets = []
    scaling = curve(rows, "db_scaling")
    for name, points in scaling.items():
        if not name.startswith("insert"):
            continue
        title = (f"Database `{name}` into {TARGET_INSERT_AT // 1000}k stored keys ≤ {TARGET_INSERT_OVER_SEARCH:g}× "
                 "`vecdb_search` of the same keys")
        at = [(x, row) for x, row in points if x >= TARGET_INSERT_AT and row.pair_ratios]
        if not at:
            targets.append(Target(title, "not measured at this size", None))
            continue
        across = "; ".join(f"{int(x):,}: {statistics.median(1 / r for r in row.pair_ratios):.2f}×"
                           for x, row in points if row.pair_ratios)
        x, row = at[0]
        ratio = statistics.median(1 / r for r in row.pair_ratios)
        measured = (f"{ratio:.2f}× at {int(x):,} keys (insert {fmt_time(row.median)}, search "
                    f"{fmt_time(row.get('paired')['median'])}, medians; {len(row.pair_ratios)} interleaved rounds). "
                    f"Insert/search by stored keys: {across}")
        why = ""
        if ratio > TARGET_INSERT_OVER_SEARCH and row.get("C") and row.get("d"):
            copied = 2 * row.get("C") * row.get("d") * 4
            why = (f"keys that merge into or split stored clusters move centers and change points in the middle of "
                   f"the database, so the insert writes fresh copies of the centers and the points ({fmt_bytes(copied)}"
                   f" at C = {row.get('C'):,}, d = {row.get('d')}, float32) instead of writing tensors that inference "
                   "threads may be searching (a published database is immutable); a batch of new keys only appends "
                   "past every view, with no copy.")
        targets.append(Target(title, measured, ratio <= TARGET_INSERT_OVER_SEARCH, why))
    for op, what in (("save", "editor.save"), ("load", "editor.reload")):
        title = f"`{what}` of a {TARGET_INSERT_AT // 1000}k-key editor in under {TARGET_PERSIST_SECONDS:g} s"
        row = next((r for points in scaling.values() for x, r in points
                    if r.get("op") == op and x == TARGET_INSERT_AT), None)
        if row is None:
            targets.append(Target(title, "not measured", None))
            continue
        baseline = row.get("paired") or {}
        measured = f"{fmt_time(row.median)} (median) for {fmt_bytes(row.get('bytes'))}" if row.get("bytes") else \
            f"{fmt_time(row.median)} (median)"
        if baseline.get("median"):
            measured += f"; {baseline.get('case')} of the same tensors {fmt_time(baseline['median'])}"
            if row.paired_ratio:
                measured += f" ({1 / row.paired_ratio:.2f}× its time, interleaved)"
        targets.append(Target(title, measured, row.median < TARGET_PERSIST_SECONDS))
    return targets


def edit_targets(rows: list[Row]) -> list[Target]:
    targets = []
    edits = [r for r in rows if r.get("plot") == "edit"]
    for setting in OrderedDict.fromkeys(r.get("setting") for r in edits):
        members = [r for r in edits if r.get("setting") == setting]
        ref = next((r for r in members if r.backend == "reference"), None)
        block = next((r for r in members if r.backend != "reference"), None)
        title = f"Editing, {setting}: block-only ≥ {TARGET_EDIT}× faster than full-rank training, lower peak memory"
        if ref is None or block is None:
            targets.append(Target(title, "not measured", None))
            continue
        ratio = ref.time / block.time
        mem_ref, mem_block = ref.get("peak_tensor_bytes"), block.get("peak_tensor_bytes")
        state_ref, state_block = ref.get("train_state_bytes"), block.get("train_state_bytes")
        lower = None if mem_ref is None or mem_block is None else mem_block < mem_ref
        # Both halves of the target must be measured to call it met; a failed half is enough to miss it.
        met = False if ratio < TARGET_EDIT or lower is False else (None if lower is None else True)
        measured = (f"{fmt_ratio(ratio)} ({fmt_time(block.time)} vs {fmt_time(ref.time)} per batch of "
                    f"{block.get('num_iter')} steps); peak tensor memory (torch.profiler) {fmt_bytes(mem_block)} vs "
                    f"{fmt_bytes(mem_ref)}; trainable state (analytic) {fmt_bytes(state_block)} vs "
                    f"{fmt_bytes(state_ref)}")
        if lower is None:
            measured += " (peak memory not measured: no verdict)"
        why = ""
        if ratio < TARGET_EDIT:
            steps = block.get("num_iter") or 1
            why += (f"Per step: block-only {fmt_time(block.time / steps)}, full-rank "
                    f"{fmt_time(ref.time / steps)} ({ref.get('bank_blocks')} blocks trained, {fmt_bytes(state_ref)} of "
                    f"trainable state instead of {fmt_bytes(state_block)}). ")
        if lower is False:
            why += "The measured peak tensor memory is not lower for block-only training. "
        targets.append(Target(title, measured, met, why.strip()))
    return targets
