"""``deepisles reader-study analyze``: unblind the raters' CSVs with key.json and report the preferences.

Per rater and overall (all raters' decisions pooled): how often each source was preferred, its share among the
decisive choices (a "no preference" is a tie: counted, left out of the share and the test), an exact two-sided
binomial test of that share against 0.5 (scipy.stats.binomtest), skipped cases (no choice, or absent from the
file), how often the left side was chosen (a side habit), and the mean 1-5 score of each source when given.
The pooled test treats every decision as independent although raters see the same cases: read it as a summary,
the per-rater tests as the tests. Agreement on the unblinded preference (source A, source B, no preference) over
the cases every rater decided: Cohen's kappa for two raters, Fleiss' kappa for more.

Rating files that do not belong to the key are errors (another study's id, unknown case numbers, missing columns,
unknown choices, a score outside 1-5, conflicting duplicate rows); identical duplicate rows (the same file sent
twice) are merged and said so.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from deepisles.errors import DeepIslesError, InputError
from deepisles.io.write import check_output_dir, write_json_atomic, write_text_atomic
from deepisles.validation.reader_study import CHOICES, KEY_FORMAT, RATING_COLUMNS

REQUIRED = ("study", "rater", "case", "choice")
NO_PREFERENCE = "no preference"
JSON_NAME = "reader_study.json"
CSV_NAME = "reader_study.csv"


@dataclass(frozen=True)
class Rating:
    choice: str  # "left" | "right" | "none" | "" (not rated)
    score_left: int | None
    score_right: int | None
    source: str  # the file it came from


# ------------------------------------------------------------------------------------------------ reading
def read_key(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "key file not found")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"key is not JSON ({exc})") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise InputError(path, f"not a reader-study key (no \"format\": \"{KEY_FORMAT}\")")
    try:
        labels = (str(key["labels"]["A"]), str(key["labels"]["B"]))
        for c in key["cases"]:
            if {c["left"], c["right"]} != set(labels):
                raise ValueError(f"case {c['number']}: sides {c['left']!r}/{c['right']!r}")
        numbers = [int(c["number"]) for c in key["cases"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"malformed key ({type(exc).__name__}: {exc})") from None
    if sorted(numbers) != list(range(1, len(numbers) + 1)):
        raise InputError(path, "malformed key: case numbers are not 1..N")
    return key


def _score(value: str, where: str) -> int | None:
    if value == "":
        return None
    if value not in {"1", "2", "3", "4", "5"}:
        raise DeepIslesError(f"{where}: score {value!r} is not one of 1-5 (or empty)")
    return int(value)


def read_ratings(paths: list[str | Path], key: dict) -> tuple[dict[str, dict[int, Rating]], list[str]]:
    """rater -> case number -> Rating, from all files; and notes (merged duplicates)."""
    if not paths:
        raise DeepIslesError("no ratings file given")
    numbers = {int(c["number"]) for c in key["cases"]}
    ratings: dict[str, dict[int, Rating]] = {}
    notes: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(p, "ratings file not found")
        try:
            reader = csv.DictReader(io.StringIO(p.read_text(encoding="utf-8-sig")))
            rows = list(reader)
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(p, f"not a readable CSV ({exc})") from None
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise InputError(p, f"ratings file lacks the column(s) {', '.join(missing)} (expected "
                                f"{', '.join(RATING_COLUMNS)}; found {', '.join(columns) or 'none'})")
        if not rows:
            raise InputError(p, "ratings file has no rows")
        merged = 0
        for line, raw in enumerate(rows, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            where = f"{p} line {line}"
            if row["study"] != key["study"]:
                raise InputError(p, f"line {line}: study {row['study']!r} is not the key's study "
                                    f"{key['study']!r} (ratings of another study, or the wrong key?)")
            if not row["rater"]:
                raise InputError(p, f"line {line}: empty rater name")
            if not row["case"].isdigit() or int(row["case"]) not in numbers:
                raise InputError(p, f"line {line}: case {row['case']!r} is not a case number of this study "
                                    f"(1-{len(numbers)})")
            if row["choice"] not in (*CHOICES, ""):
                raise InputError(p, f"line {line}: choice {row['choice']!r} is not one of "
                                    f"{', '.join(CHOICES)} or empty")
            r = Rating(row["choice"], _score(row.get("score_left", ""), where),
                       _score(row.get("score_right", ""), where), str(p))
            mine = ratings.setdefault(row["rater"], {})
            number = int(row["case"])
            old = mine.get(number)
            if old is not None:
                if (old.choice, old.score_left, old.score_right) != (r.choice, r.score_left, r.score_right):
                    raise InputError(p, f"line {line}: rater {row['rater']!r} rated case {number} twice, "
                                        f"differently (also in {old.source})")
                merged += 1
                continue
            mine[number] = r
        if merged:
            notes.append(f"{p}: {merged} row(s) repeat identical earlier ratings (same rater and case); "
                         "counted once")
    return ratings, notes


# ------------------------------------------------------------------------------------------------ statistics
def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels of the same items (None when chance agreement is 1)."""
    cats = sorted(set(a) | set(b))
    n = len(a)
    if n == 0 or len(b) != n:
        return None
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[c] * cb[c] for c in cats) / n**2
    return None if math.isclose(pe, 1.0) else (po - pe) / (1 - pe)


def fleiss_kappa(counts: np.ndarray) -> float | None:
    """Fleiss' kappa of an items x categories table of counts, each row summing to the number of raters."""
    counts = np.asarray(counts, dtype=float)
    n_items = counts.shape[0]
    m = counts.sum(axis=1)
    if n_items == 0 or not np.allclose(m, m[0]) or m[0] < 2:
        return None
    m = m[0]
    p_item = ((counts**2).sum(axis=1) - m) / (m * (m - 1))
    p_cat = counts.sum(axis=0) / (n_items * m)
    pe = float((p_cat**2).sum())
    return None if math.isclose(pe, 1.0) else (float(p_item.mean()) - pe) / (1 - pe)


def _tally(decisions: list[tuple[str, Rating]], labels: tuple[str, str], n_cases: int) -> dict:
    """decisions: (source shown on the left, rating) per rated-or-skipped case."""
    a, b = labels
    prefer = Counter()
    scores: dict[str, list[int]] = {a: [], b: []}
    left_picks = right_picks = ties = 0
    for left_source, r in decisions:
        right_source = b if left_source == a else a
        if r.choice == "left":
            prefer[left_source] += 1
            left_picks += 1
        elif r.choice == "right":
            prefer[right_source] += 1
            right_picks += 1
        elif r.choice == "none":
            ties += 1
        for side_source, s in ((left_source, r.score_left), (right_source, r.score_right)):
            if s is not None:
                scores[side_source].append(s)
    decisive = prefer[a] + prefer[b]
    rated = decisive + ties
    out = {
        "cases": n_cases, "rated": rated, "skipped": n_cases - rated, "no_preference": ties,
        "prefer": {a: prefer[a], b: prefer[b]},
        "share": {s: (prefer[s] / decisive if decisive else None) for s in labels},
        "binomial_p": binomtest(prefer[a], decisive, 0.5, alternative="two-sided").pvalue if decisive else None,
        "left_chosen": left_picks / decisive if decisive else None,
        "mean_score": {s: (float(np.mean(v)) if v else None) for s, v in scores.items()},
        "scored": {s: len(v) for s, v in scores.items()},
    }  # fmt: skip
    return out


def analyze(key_path: str | Path, rating_paths: list[str | Path]) -> dict:
    """The report (JSON-ready dict): labels, per-rater and overall tallies, agreement, notes."""
    key = read_key(key_path)
    labels = (key["labels"]["A"], key["labels"]["B"])
    ratings, notes = read_ratings(rating_paths, key)
    left_of = {int(c["number"]): c["left"] for c in key["cases"]}
    n = len(left_of)
    per_rater, pooled = {}, []
    for rater in sorted(ratings):
        mine = ratings[rater]
        absent = n - len(mine)
        if absent:
            notes.append(f"rater {rater!r}: {absent} of {n} case(s) absent from the file(s); counted as skipped")
        decisions = [(left_of[k], r) for k, r in sorted(mine.items())]
        per_rater[rater] = _tally(decisions, labels, n)
        pooled += decisions
    overall = _tally(pooled, labels, n * len(per_rater))

    def unblinded(r: Rating, k: int) -> str:
        a, b = labels
        if r.choice == "none":
            return NO_PREFERENCE
        return left_of[k] if r.choice == "left" else (b if left_of[k] == a else a)

    raters = sorted(ratings)
    common = sorted(k for k in left_of if all(ratings[x].get(k) and ratings[x][k].choice for x in raters))
    agreement: dict = {"raters": len(raters), "cases": len(common), "categories": [*labels, NO_PREFERENCE]}
    if len(raters) < 2:
        agreement.update(method=None, kappa=None, note="one rater: no agreement to measure")
    else:
        table = [[unblinded(ratings[x][k], k) for x in raters] for k in common]
        if len(raters) == 2:
            agreement.update(method="Cohen's kappa", kappa=cohen_kappa([t[0] for t in table], [t[1] for t in table]))
        else:
            cats = agreement["categories"]
            counts = np.array([[row.count(c) for c in cats] for row in table]).reshape(len(table), len(cats))
            agreement.update(method="Fleiss' kappa", kappa=fleiss_kappa(counts))
        agreement["observed_agreement"] = (sum(len(set(t)) == 1 for t in table) / len(table)) if table else None
        if agreement["kappa"] is None:
            agreement["note"] = ("undefined: no case decided by every rater" if not common
                                 else "undefined: every decision falls in one category")
    return {
        "study": key["study"], "labels": {"A": labels[0], "B": labels[1]}, "cases": n,
        "excluded_at_build": key.get("excluded", []), "raters": per_rater, "overall": overall,
        "agreement": agreement, "notes": notes, "test": "exact two-sided binomial test of the share preferring "
        f"{labels[0]} against 0.5 among decisive choices (no-preference ties excluded)",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ writing
def table_rows(result: dict) -> list[dict]:
    """One flat row per rater and 'overall' (the CSV and the printed table)."""
    a, b = result["labels"]["A"], result["labels"]["B"]
    rows = []
    for who, t in [*result["raters"].items(), ("overall", result["overall"])]:
        rows.append({
            "rater": who, "cases": t["cases"], "rated": t["rated"], "skipped": t["skipped"],
            f"prefer_{a}": t["prefer"][a], f"prefer_{b}": t["prefer"][b], "no_preference": t["no_preference"],
            f"share_{a}": t["share"][a], f"share_{b}": t["share"][b], "binomial_p": t["binomial_p"],
            "left_chosen": t["left_chosen"], f"mean_score_{a}": t["mean_score"][a],
            f"mean_score_{b}": t["mean_score"][b],
        })  # fmt: skip
    return rows


def write_results(result: dict, outdir: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    outdir = Path(outdir)
    check_output_dir(outdir, (JSON_NAME, CSV_NAME), overwrite)
    rows = table_rows(result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return write_json_atomic(outdir / JSON_NAME, result), write_text_atomic(outdir / CSV_NAME, buf.getvalue())
