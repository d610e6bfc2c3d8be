"""Stratified evaluation (``deepisles evaluate --by ... --out-dir DIR``): the ISLES'22 metrics per stratum.

Strata:

* ``volume`` - reference lesion volume in mL, bins ``[lo, hi)`` at :data:`VOLUME_BINS_ML` (``<1``, ``1-5``,
  ``5-20``, ``20-70``, ``>=70`` mL by default);
* ``count`` - reference lesion count (26-connected), bins ending at :data:`COUNT_BINS` (``1``, ``2-5``, ``>5``);
* any other name - a participants.tsv column or DWI JSON-sidecar field (:mod:`deepisles.validation.attributes`),
  one stratum per value.

A case with an empty reference mask is its own stratum ``empty reference`` for volume and count (its Dice and F1
are 1 only when the prediction is empty too); a case without a value of an attribute is in the stratum ``n/a``
with the reason in strata.json. Every case is in exactly one stratum of each ``--by``: nothing is dropped.

Per stratum and metric: n, median, quartiles (linear interpolation, as numpy), mean and its bootstrap confidence
interval (percentile method of :func:`scipy.stats.bootstrap`, ``resamples`` resamples, 95 %; none for n < 2 or
``resamples`` 0). The random stream of each (by, stratum, metric) is seeded from ``seed`` and its name, so a
stratum's interval does not depend on the other strata. Bland-Altman: the difference predicted - reference volume
against their mean over every case; bias = mean difference, limits of agreement = bias +- 1.96 SD (ddof 1).

Written to ``DIR``: ``cases.csv`` (per case: metrics, volumes, counts, stratum of each --by), ``strata.csv`` (one
row per by, stratum, metric), ``strata.json`` (everything, with exclusion reasons), ``strata_<by>.png`` (box plots
of Dice, lesion F1 and absolute volume difference per stratum) and ``bland_altman.png``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
from scipy import stats

from deepisles.errors import DeepIslesError
from deepisles.io.write import check_output_dir, write_json_atomic, write_text_atomic
from deepisles.metrics import METRICS, VOLUME_COLUMNS, pair_cases
from deepisles.progress import Progress, as_progress
from deepisles.validation import attributes as A
from deepisles.validation import plots

VOLUME_BINS_ML = (1.0, 5.0, 20.0, 70.0)
COUNT_BINS = (1, 5)
BUILTIN = ("volume", "count")
EMPTY = "empty reference"
NA = "n/a"
CONFIDENCE = 0.95
LOA_Z = 1.96
STAT_COLUMNS = ("median", "q1", "q3", "mean", "ci_low", "ci_high")
FIXED_OUTPUTS = ("cases.csv", "strata.csv", "strata.json", "bland_altman.png")


# ------------------------------------------------------------------------------------------------- bins
def parse_bins(text: str | Sequence[float] | None, what: str, integer: bool) -> tuple:
    """``"1,5,20,70"`` (or a sequence) -> strictly increasing positive edges; DeepIslesError otherwise."""
    if text is None:
        return COUNT_BINS if integer else VOLUME_BINS_ML
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    try:
        edges = tuple(int(v) if integer else float(v) for v in items)
        if integer and any(float(v) != int(v) for v in items):
            raise ValueError
    except (TypeError, ValueError):
        kind = "whole numbers" if integer else "numbers"
        raise DeepIslesError(f"{what} {text}: expected comma-separated {kind}, e.g. "
                             f"{'1,5' if integer else '1,5,20,70'}") from None  # fmt: skip
    if not edges or edges[0] <= 0 or any(b <= a for a, b in pairwise(edges)) or not all(map(math.isfinite, edges)):
        raise DeepIslesError(f"{what} {text}: expected strictly increasing positive edges")
    return edges


def volume_labels(edges: Sequence[float]) -> list[str]:
    e = [f"{v:g}" for v in edges]
    return [f"<{e[0]} mL", *(f"{a}-{b} mL" for a, b in pairwise(e)), f">={e[-1]} mL"]


def volume_stratum(volume_ml: float, edges: Sequence[float]) -> str:
    if volume_ml <= 0:
        return EMPTY
    return volume_labels(edges)[int(np.searchsorted(np.asarray(edges, float), volume_ml, side="right"))]


def count_labels(edges: Sequence[int]) -> list[str]:
    lows = [1, *(e + 1 for e in edges[:-1])]
    return [*(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in zip(lows, edges, strict=True)), f">{edges[-1]}"]


def count_stratum(count: int, edges: Sequence[int]) -> str:
    if count <= 0:
        return EMPTY
    return count_labels(edges)[int(np.searchsorted(np.asarray(edges), count, side="left"))]


# ------------------------------------------------------------------------------------------------- statistics
def bootstrap_ci(values: np.ndarray, resamples: int, seed: int, key: str) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; NaN for fewer than 2 values or no resamples."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or resamples <= 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]))
    res = stats.bootstrap((values,), np.mean, n_resamples=int(resamples), confidence_level=CONFIDENCE,
                          method="percentile", vectorized=True, rng=rng)  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def describe(values: Sequence[float], resamples: int, seed: int, key: str) -> dict:
    """n, median, q1, q3, mean, ci_low, ci_high of ``values`` (NaN statistics when empty)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0, **dict.fromkeys(STAT_COLUMNS, float("nan"))}
    q1, med, q3 = (float(x) for x in np.percentile(v, [25, 50, 75]))
    lo, hi = bootstrap_ci(v, resamples, seed, key)
    return {"n": int(v.size), "median": med, "q1": q1, "q3": q3, "mean": float(v.mean()), "ci_low": lo,
            "ci_high": hi}  # fmt: skip


def bland_altman(pred: Sequence[float], ref: Sequence[float]) -> dict:
    """Bias (mean of pred - ref) and 95 % limits of agreement (bias +- 1.96 SD, ddof 1) of two volume lists."""
    p, r = np.asarray(pred, np.float64), np.asarray(ref, np.float64)
    diff = p - r
    bias = float(diff.mean()) if diff.size else float("nan")
    sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    return {"n": int(diff.size), "bias_ml": bias, "sd_ml": sd, "loa_low_ml": bias - LOA_Z * sd,
            "loa_high_ml": bias + LOA_Z * sd}  # fmt: skip


# ------------------------------------------------------------------------------------------------- strata
def _order(name: str, labels: dict[str, str], volume_bins, count_bins) -> list[str]:
    present = set(labels.values())
    if name in BUILTIN:
        bins = volume_labels(volume_bins) if name == "volume" else count_labels(count_bins)
        return [*bins, *([EMPTY] if EMPTY in present else [])]
    values = sorted(present - {NA})
    try:
        values = sorted(values, key=float)
    except ValueError:
        pass
    return [*values, *([NA] if NA in present else [])]


def assign(rows: Sequence[dict], name: str, attrs: A.Attributes | None, volume_bins, count_bins) -> dict[str, str]:
    """case -> stratum of ``name`` for every row."""
    out = {}
    for r in rows:
        if name == "volume":
            out[r["case"]] = volume_stratum(float(r["ref_volume_ml"]), volume_bins)
        elif name == "count":
            out[r["case"]] = count_stratum(int(r["ref_lesion_count"]), count_bins)
        else:
            out[r["case"]] = (attrs.values.get(r["case"], {}) if attrs else {}).get(name, NA)
    return out


def _clean(obj):
    """NaN -> None (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def output_names(by: Sequence[str]) -> list[str]:
    return [*FIXED_OUTPUTS, *(f"strata_{_safe(b)}.png" for b in by)]


@dataclass
class StrataPlan:
    """Checked options of a stratified evaluation, and the attributes of its cases (read before any scoring)."""

    by: tuple[str, ...]
    out_dir: Path
    resamples: int = 2000
    seed: int = 0
    volume_bins: tuple = VOLUME_BINS_ML
    count_bins: tuple = COUNT_BINS
    attrs: A.Attributes | None = None
    notes: dict = field(default_factory=dict)

    def stratify(self, rows: Sequence[dict]) -> dict:
        """The strata report (what strata.json holds; None for statistics without a value) of scored ``rows``
        (with :data:`VOLUME_COLUMNS`)."""
        report: dict = {
            "n_cases": len(rows),
            "metrics": list(METRICS),
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "confidence": CONFIDENCE,
                          "method": "percentile (scipy.stats.bootstrap); none for n < 2"},  # fmt: skip
            "volume_bins_ml": list(self.volume_bins),
            "count_bins": list(self.count_bins),
            "overall": {m: describe([r[m] for r in rows], self.resamples, self.seed, f"all/all/{m}") for m in METRICS},
            "by": {},
            "bland_altman": bland_altman([r["pred_volume_ml"] for r in rows], [r["ref_volume_ml"] for r in rows]),
            "attributes": self.notes,
        }
        for name in self.by:
            labels = assign(rows, name, self.attrs, self.volume_bins, self.count_bins)
            strata = []
            for s in _order(name, labels, self.volume_bins, self.count_bins):
                members = [r for r in rows if labels[r["case"]] == s]
                strata.append({
                    "stratum": s,
                    "n": len(members),
                    "cases": [r["case"] for r in members],
                    "metrics": {m: describe([r[m] for r in members], self.resamples, self.seed, f"{name}/{s}/{m}")
                                for m in METRICS},
                })  # fmt: skip
            missing = self.attrs.missing.get(name, {}) if self.attrs and name not in BUILTIN else {}
            source = "reference mask" if name in BUILTIN else self.attrs.columns[name]
            report["by"][name] = {"source": source, "strata": strata,
                                  "n_a": {c: missing.get(c, "") for c in labels if labels[c] == NA}}  # fmt: skip
        return _clean(report)

    def write(self, report: dict, rows: Sequence[dict], progress: Progress | None = None) -> dict[str, Path]:
        progress = as_progress(progress)
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        progress.step("writing the strata tables")
        labels = {b: assign(rows, b, self.attrs, self.volume_bins, self.count_bins) for b in self.by}
        per_case = [[r["case"], *(r[c] for c in (*METRICS, *VOLUME_COLUMNS)), *(labels[b][r["case"]] for b in self.by)]
                    for r in rows]  # fmt: skip
        files["cases"] = write_text_atomic(out / "cases.csv", _csv(["case", *METRICS, *VOLUME_COLUMNS, *self.by],
                                                                   per_case))  # fmt: skip
        blocks = [("all", [{"stratum": "all", "n": report["n_cases"], "metrics": report["overall"]}])]
        blocks += [(name, block["strata"]) for name, block in report["by"].items()]
        table = [[name, s["stratum"], s["n"], m, *(s["metrics"][m][c] for c in STAT_COLUMNS)]
                 for name, strata in blocks for s in strata for m in METRICS]  # fmt: skip
        files["strata_csv"] = write_text_atomic(out / "strata.csv", _csv(["by", "stratum", "n", "metric",
                                                                          *STAT_COLUMNS], table))  # fmt: skip
        progress.step("drawing the plots")
        for name, block in report["by"].items():
            by_case = {r["case"]: r for r in rows}
            values = {s["stratum"]: [by_case[c] for c in s["cases"]] for s in block["strata"]}
            files[f"strata_{name}"] = plots.box_plots(out / f"strata_{_safe(name)}.png", name, values)
        files["bland_altman"] = plots.bland_altman_plot(
            out / "bland_altman.png", [r["pred_volume_ml"] for r in rows], [r["ref_volume_ml"] for r in rows],
            report["bland_altman"])  # fmt: skip
        report["files"] = {k: str(v) for k, v in files.items()}
        files["strata_json"] = write_json_atomic(out / "strata.json", report)
        return files

    def run(self, rows: Sequence[dict], progress: Progress | None = None) -> dict:
        """Stratify ``rows``, write every output; returns the report."""
        as_progress(progress).step("bootstrap confidence intervals")
        report = self.stratify(rows)
        self.write(report, rows, progress)
        return report


def _csv(header: Sequence[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if isinstance(v, float) and not math.isfinite(v) else (repr(v) if isinstance(v, float) else v)
                    for v in r])  # fmt: skip
    return buf.getvalue()


def prepare(
    pred: Path,
    gt: Path,
    *,
    by: Sequence[str] = (),
    out_dir: Path,
    dataset: Path | None = None,
    resamples: int = 2000,
    seed: int = 0,
    volume_bins: str | Sequence[float] | None = None,
    count_bins: str | Sequence[int] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> StrataPlan:
    """Check every option, the output folder and the ``--by`` names (reading the dataset's participants.tsv and
    DWI sidecars) before anything is scored; DeepIslesError with a one-line reason otherwise."""
    by = tuple(dict.fromkeys(b.strip() for b in by))
    if any(not b for b in by):
        raise DeepIslesError("--by: empty name; expected volume, count or a participants.tsv / sidecar column")
    if resamples < 0:
        raise DeepIslesError(f"--bootstrap {resamples}: expected 0 (no intervals) or more resamples")
    plan = StrataPlan(by=by, out_dir=Path(out_dir), resamples=int(resamples), seed=int(seed),
                      volume_bins=parse_bins(volume_bins, "--volume-bins", integer=False),
                      count_bins=parse_bins(count_bins, "--count-bins", integer=True))  # fmt: skip
    check_output_dir(plan.out_dir, output_names(by), overwrite)
    wanted = [b for b in by if b not in BUILTIN]
    if wanted:
        root = Path(dataset) if dataset is not None else A.dataset_root(Path(gt))
        if root is None:
            raise DeepIslesError(f"--by {', '.join(wanted)}: {gt} is not an ISLES'22/BIDS dataset (no derivatives/); "
                                 "give --dataset DIR, the dataset holding participants.tsv and the DWI sidecars")
        if not root.is_dir():
            raise DeepIslesError(f"--dataset {root}: no such folder")
        as_progress(progress).step("reading participants.tsv and DWI sidecars")
        cases = [case for case, _, _ in pair_cases(Path(pred), Path(gt))]
        plan.attrs = A.collect(cases, root, wanted)
        plan.notes = {**plan.attrs.notes, "columns": {b: plan.attrs.columns[b] for b in wanted}}
    return plan
