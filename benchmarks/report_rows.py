"""The rows of pytest-benchmark JSON as ``report.py`` reads them (:class:`Row`: one result, its time by the
chosen statistic, its interleaved ratio), grouped, with each group's baseline and each plot's curves, and the
number formats every part of ``BENCHMARKS.md`` uses."""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

LINEAR_CASE = "nn.Linear (no LoRA)"


# ---- loading ---------------------------------------------------------------------------------------------


class Row:
    """One benchmark result."""

    def __init__(self, raw: dict, stat: str, source: str):
        self.raw = raw
        self.source = source
        self.group = raw.get("group") or raw["name"]
        self.name = raw["name"]
        self.info = raw.get("extra_info") or {}
        self.params = raw.get("params") or {}
        stats = raw["stats"]
        self.stat = stat
        self.time = float(stats[stat])
        self.rounds = int(stats.get("rounds", 0))
        self.iqr = float(stats.get("iqr", 0.0))
        self.median = float(stats.get("median", self.time))

    @property
    def pair_ratios(self) -> list[float]:
        """Per round: the interleaved baseline's time / this row's time in the same round."""
        paired = self.info.get("paired") or {}
        data = self.raw["stats"].get("data") or []
        times = paired.get("times") or []
        if not times or len(times) != len(data):
            return []
        return sorted(b / t for b, t in zip(times, data, strict=True) if t > 0)

    @property
    def paired_ratio(self) -> float | None:
        """Interleaved baseline / this row: the median of the per-round ratios; None without per-round times.

        (A ratio of two minima is not an interleaved ratio: the two minima may come from different
        rounds, under different load.)
        """
        ratios = self.pair_ratios
        if not ratios:
            return None
        mid = len(ratios) // 2
        return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2

    @property
    def faults(self) -> int | None:
        """Minor page faults per call (fresh memory the call touched), when the case counted them."""
        return self.info.get("minor_faults_per_call")

    @property
    def case(self) -> str:
        return str(self.info.get("case") or self.info.get("backend") or self.params.get("backend") or self.name)

    @property
    def backend(self):
        return self.info.get("backend") or self.params.get("backend")

    def get(self, key, default=None):
        return self.info.get(key, default)


def load(paths: list[Path], stat: str) -> tuple[list[Row], list[dict]]:
    rows, metas = [], []
    for path in paths:
        data = json.loads(path.read_text())
        metas.append({"path": str(path), **{k: data.get(k) for k in ("machine_info", "commit_info", "datetime",
                                                                       "version", "melo_fast_source")}})
        rows += [Row(raw, stat, str(path)) for raw in data.get("benchmarks", [])]
    return rows, metas


def groups_of(rows: list[Row]) -> OrderedDict[str, list[Row]]:
    groups: OrderedDict[str, list[Row]] = OrderedDict()
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return groups


def baseline_of(rows: list[Row]) -> Row | None:
    named = next((r.get("baseline") for r in rows if r.get("baseline")), None)
    if named is not None:
        return next((r for r in rows if r.case == named), None)
    for backend in ("reference", "torch"):
        found = next((r for r in rows if r.backend == backend), None)
        if found is not None:
            return found
    return None


# ---- formatting ------------------------------------------------------------------------------------------


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def fmt_ratio(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3g}×" if value < 1000 else f"{value:,.0f}×"


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    return f"{n / 2**20:,.1f} MiB"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)



def curve(rows: list[Row], plot: str) -> OrderedDict[str, list[tuple[float, Row]]]:
    series: OrderedDict[str, list[tuple[float, Row]]] = OrderedDict()
    for row in rows:
        if row.get("plot") == plot and row.get("x") is not None:
            series.setdefault(str(row.get("series")), []).append((float(row.get("x")), row))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series
