"""``deepisles reader-study build``: a blinded two-mask preference study as one offline HTML page + its key.

Input: a case list (CSV, or TSV by its ``.tsv`` suffix) with the columns ``case, dwi, adc, mask_a, mask_b``
(paths relative to the list's folder), the two sources named by ``label_a`` / ``label_b`` ("expert", "model").
Each case becomes two static PNGs (matplotlib, Agg), one per side: a few axial slices through the lesions of
either mask, DWI and ADC, the side's mask outlined. Static pictures rather than the NiiVue viewer of
report.html: every rater sees the same slices and window, the page stays small and light for dozens of cases,
and nothing depends on WebGL. Both sides are drawn by one function with the same slices, crop, window and colour,
so the pictures differ only by the masks.

Blinding: the page holds a random study id, blinded case numbers 1..N and the pictures - no labels, case ids or
file names. Case order is a random permutation and the sides are balanced (half the cases show source A on the
left, in a random arrangement) so that a rater's habit of picking one side cannot look like a preference for a
source. ``key.json`` (for the organiser only) maps each number to the case and the source shown on each side.

A case whose two masks are both empty is excluded (nothing to compare) and listed in key.json and the summary;
a case with one empty mask is kept (a missed lesion is a real difference) and noted. Unreadable or
non-overlapping images are errors: no case is ever dropped silently.
"""

from __future__ import annotations

import csv
import html
import io
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nibabel.orientations import apply_orientation, io_orientation  # noqa: E402

from deepisles.errors import DeepIslesError, InputError  # noqa: E402
from deepisles.io.image import Image  # noqa: E402
from deepisles.io.write import check_output_dir, write_json_atomic, write_text_atomic  # noqa: E402
from deepisles.progress import Progress, as_progress  # noqa: E402

HTML_NAME = "study.html"
KEY_NAME = "key.json"
KEY_FORMAT = "deepisles-reader-study-key"
TEMPLATE = Path(__file__).with_name("reader_study.html")
CASE_COLUMNS = ("case", "dwi", "adc", "mask_a", "mask_b")
#: what the rater's CSV holds (the page writes it; analyze reads it)
RATING_COLUMNS = ("study", "rater", "case", "choice", "score_left", "score_right", "time")
CHOICES = ("left", "right", "none")  # "none": no preference; an empty choice: not rated
OUTLINE = "#ffd000"
_TILE_IN, _DPI = 2.4, 110  # a tile of about 260 pixels (the page scales it to the window)
# a BIDS subject entity in a file name (alphanumeric label): the files of one case must not name two subjects
_SUB_RE = re.compile(r"(?<![A-Za-z0-9])(sub-[A-Za-z0-9]+)(?![A-Za-z0-9])")


@dataclass(frozen=True)
class StudyCase:
    case: str
    dwi: Path
    adc: Path
    mask_a: Path
    mask_b: Path


@dataclass
class BuildSummary:
    study: str
    outdir: Path
    cases: int
    excluded: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ case list
def read_case_list(path: str | Path) -> list[StudyCase]:
    """The case list: one row per case, columns :data:`CASE_COLUMNS`; every problem is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "case list not found")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(path, "case list is not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in CASE_COLUMNS if c not in columns]
    if missing:
        raise InputError(path, f"case list lacks the column(s) {', '.join(missing)} (needs {', '.join(CASE_COLUMNS)}; "
                               f"found {', '.join(columns) or 'none'})")
    cases: list[StudyCase] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(row.values()):
            continue  # a blank line
        empty = [c for c in CASE_COLUMNS if not row.get(c)]
        if empty:
            raise InputError(path, f"line {line}: empty {', '.join(empty)}")
        if row["case"] in seen:
            raise InputError(path, f"line {line}: case {row['case']!r} is listed twice (also line {seen[row['case']]})")
        seen[row["case"]] = line
        paths = {c: (path.parent / row[c]) for c in CASE_COLUMNS[1:]}
        for c, p in paths.items():
            if not p.exists():
                raise InputError(p, f"{c} of case {row['case']!r} (case list line {line}) not found")
        subjects = {c: m.group(1) for c, p in paths.items() if (m := _SUB_RE.search(p.name))}
        if len(set(subjects.values())) > 1:
            named = ", ".join(f"{c} {s}" for c, s in subjects.items())
            raise InputError(path, f"line {line}: the files of case {row['case']!r} name different subjects ({named})")
        if paths["mask_a"].resolve() == paths["mask_b"].resolve():
            raise InputError(path, f"line {line}: mask_a and mask_b of case {row['case']!r} are the same file")
        cases.append(StudyCase(row["case"], **paths))
    if not cases:
        raise InputError(path, "case list has no cases")
    return cases


# ------------------------------------------------------------------------------------------------ loading
def _read_mask(path: Path, which: str, dwi: Image) -> np.ndarray:
    """A mask as a boolean array on the DWI grid (resampled by nearest neighbour when on another grid)."""
    from deepisles.io.read import read_image
    from deepisles.io.validate import check_3d, check_overlap
    from deepisles.preprocess.resample import resample_to

    img = check_3d(read_image(path, "mask"), "mask")
    data = np.asarray(img.data)
    if not np.all(np.isfinite(data)):
        raise InputError(path, f"{which} holds NaN or infinite values")
    if not img.same_grid(dwi, atol=1e-4):
        check_overlap(dwi, img, other_role="mask")
        img = resample_to(Image((data != 0).astype(np.uint8), img.affine, img.source), dwi, order=0)
        data = np.asarray(img.data)
    return data != 0


def load_case(case: StudyCase) -> tuple[Image, Image, np.ndarray, np.ndarray]:
    """DWI, ADC (10^-3 mm^2/s, DWI grid) and both masks (bool, DWI grid) of one case."""
    from deepisles.preprocess.inputs import load_inputs

    loaded = load_inputs(case.dwi, case.adc)
    return (loaded.dwi, loaded.adc, _read_mask(case.mask_a, "mask_a", loaded.dwi),
            _read_mask(case.mask_b, "mask_b", loaded.dwi))


# ------------------------------------------------------------------------------------------------ pictures
def _ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    return apply_orientation(data, ornt), spacing


def choose_slices(mask_a: np.ndarray, mask_b: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` axial (last-axis) indices: the slice holding most of each mask (so neither source's lesion is
    left out of view), then slices spread evenly over those holding lesion of either mask. A and B are treated
    alike: the choice does not depend on which mask is which."""
    per_a, per_b = mask_a.sum(axis=(0, 1)), mask_b.sum(axis=(0, 1))
    z = np.flatnonzero(per_a + per_b)
    if z.size == 0:
        return []
    chosen = sorted({int(np.argmax(p)) for p in (per_a, per_b) if p.any()})[:n]
    spread = np.quantile(np.arange(z.size), (np.arange(n) + 0.5) / n, method="nearest")
    for i in spread:
        if len(chosen) >= n:
            break
        if int(z[int(i)]) not in chosen:
            chosen.append(int(z[int(i)]))
    for k in z[np.argsort(-(per_a + per_b)[z], kind="stable")]:  # duplicates: the slices with most lesion
        if len(chosen) >= n:
            break
        if int(k) not in chosen:
            chosen.append(int(k))
    return sorted(chosen)


def _crop(dwi: np.ndarray, union: np.ndarray, margin: int = 3) -> tuple[slice, slice]:
    """In-plane box of the head (non-zero DWI) and the lesions, with a margin (whole plane if no background)."""
    keep = (dwi != 0).any(axis=2) | union.any(axis=2)
    ii, jj = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    if ii.size == 0:
        return slice(None), slice(None)
    return (slice(max(ii[0] - margin, 0), ii[-1] + margin + 1), slice(max(jj[0] - margin, 0), jj[-1] + margin + 1))


def _window(vol: np.ndarray, adc: bool) -> tuple[float, float]:
    nz = vol[vol != 0]
    lo, hi = (float(v) for v in np.percentile(nz, [1, 99.5])) if nz.size else (0.0, 1.0)
    if adc:
        lo, hi = 0.0, (min(hi, 2.0) if hi > 0 else 1.0)
    return lo, (hi if hi > lo else lo + 1.0)


def render_side(dwi: np.ndarray, adc: np.ndarray, mask: np.ndarray, slices: list[int], spacing) -> bytes:
    """PNG of one side: a row per slice, DWI and ADC, the mask outlined. Arrays are RAS-ordered and cropped;
    shown as preview.png does: patient's right on the right ("R"), anterior up."""
    windows = (_window(dwi, False), _window(adc, True))
    aspect = float(spacing[1] / spacing[0])
    fig, axes = plt.subplots(len(slices), 2, figsize=(2 * _TILE_IN, _TILE_IN * len(slices)), squeeze=False,
                             facecolor="black")
    for r, z in enumerate(slices):
        for c, (vol, (lo, hi), name) in enumerate(zip((dwi, adc), windows, ("DWI", "ADC"), strict=True)):
            ax = axes[r, c]
            ax.imshow(vol[:, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                      interpolation="nearest")
            m = mask[:, :, z].T
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=OUTLINE, linewidths=1.0)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(name, color="white", fontsize=9)
                ax.text(0.97, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=8, va="center", ha="right")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.3 / (_TILE_IN * len(slices)),
                        wspace=0.03, hspace=0.03)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=_DPI, facecolor="black", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def case_pictures(dwi: Image, adc: Image, mask_a: np.ndarray, mask_b: np.ndarray, n_slices: int
                  ) -> tuple[bytes, bytes, list[int]]:
    """The PNGs of source A and source B (same slices, crop and window) and the slices shown."""
    d, spacing = _ras(np.nan_to_num(np.asarray(dwi.data, np.float32)), dwi.affine)
    a = _ras(np.nan_to_num(np.asarray(adc.data, np.float32)), dwi.affine)[0]
    ma, mb = _ras(mask_a, dwi.affine)[0], _ras(mask_b, dwi.affine)[0]
    slices = choose_slices(ma, mb, n_slices)
    ci, cj = _crop(d, ma | mb)
    parts = [v[ci, cj] for v in (d, a, ma, mb)]
    return (render_side(parts[0], parts[1], parts[2], slices, spacing),
            render_side(parts[0], parts[1], parts[3], slices, spacing), slices)


# ------------------------------------------------------------------------------------------------ the page
def balanced_sides(n: int, rng: np.random.Generator) -> list[bool]:
    """``n`` flags "source A on the left": half of them True (the odd one random), in random order."""
    flags = np.zeros(n, bool)
    flags[: n // 2 + (int(rng.integers(2)) if n % 2 else 0)] = True
    return [bool(v) for v in rng.permutation(flags)]


def render_page(study: str, pictures: list[tuple[bytes, bytes]], title: str) -> str:
    """study.html: per blinded case number (1-based, in list order) its left and right pictures."""
    import base64

    sections = []
    for number, (left, right) in enumerate(pictures, start=1):
        imgs = "".join(
            f'<figure class="side"><figcaption>{side}</figcaption>'
            f'<img alt="{side}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"></figure>'
            for side, png in (("left", left), ("right", right))
        )
        sections.append(
            f'<section class="case" id="case-{number}" data-case="{number}">'
            f'<h2>Case {number} <span class="state"></span></h2><div class="sides">{imgs}</div>'
            f'<div class="controls"><span class="scores">'
            f'{_score_select("left")}{_score_select("right")}</span>'
            f'<button type="button" data-choice="left">left better</button>'
            f'<button type="button" data-choice="none">no preference</button>'
            f'<button type="button" data-choice="right">right better</button></div></section>'
        )
    values = {"TITLE": html.escape(title), "STUDY": study, "N": str(len(pictures)),
              "COLUMNS": ",".join(RATING_COLUMNS), "CASES": "\n".join(sections)}
    # one pass: a value (the title) that holds "{{...}}" is never substituted again
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text(encoding="utf-8"))


def _score_select(side: str) -> str:
    options = "".join(f'<option value="{v}">{v or "–"}</option>' for v in ("", "1", "2", "3", "4", "5"))
    return f'<label>{side} score (1-5, optional) <select data-score="{side}">{options}</select></label>'


# ------------------------------------------------------------------------------------------------ build
def build_study(
    cases_file: str | Path,
    outdir: str | Path,
    *,
    label_a: str = "A",
    label_b: str = "B",
    seed: int | None = None,
    slices: int = 3,
    title: str = "Blinded segmentation reader study",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildSummary:
    """Write ``outdir``/study.html (for the raters) and ``outdir``/key.json (the organiser's unblinding key).

    ``seed`` fixes case order and sides (None: a fresh random seed, recorded in key.json)."""
    progress = as_progress(progress)
    label_a, label_b = label_a.strip(), label_b.strip()
    if not label_a or not label_b or label_a == label_b:
        raise DeepIslesError(f"the two sources need two different, non-empty labels (got {label_a!r}, {label_b!r})")
    if slices < 1:
        raise DeepIslesError(f"--slices {slices}: need at least 1")
    outdir = Path(outdir)
    check_output_dir(outdir, (HTML_NAME, KEY_NAME), overwrite)
    cases = read_case_list(cases_file)
    seed = secrets.randbits(32) if seed is None else int(seed)
    rng = np.random.default_rng(seed)

    kept: list[tuple[StudyCase, bytes, bytes, list[int], list[str]]] = []
    summary = BuildSummary(study=secrets.token_hex(6), outdir=outdir, cases=0)
    for i, case in enumerate(cases):
        progress.advance(i, len(cases), case.case)
        dwi, adc, ma, mb = load_case(case)
        empty = [name for name, m in ((f"mask_a ({label_a})", ma), (f"mask_b ({label_b})", mb)) if not m.any()]
        if len(empty) == 2:
            summary.excluded.append({"case": case.case, "reason": "both masks are empty: nothing to compare"})
            continue
        notes = [f"{empty[0]} is empty: kept (one side shows no outline)"] if empty else []
        summary.notes += [f"case {case.case}: {n}" for n in notes]
        png_a, png_b, shown = case_pictures(dwi, adc, ma, mb, slices)
        kept.append((case, png_a, png_b, shown, notes))
    progress.advance(len(cases), len(cases))
    if not kept:
        raise DeepIslesError(f"{cases_file}: no case left to rate (every case has two empty masks)")

    order = rng.permutation(len(kept))
    a_left = balanced_sides(len(kept), rng)
    pictures, key_cases = [], []
    for number, (idx, left_is_a) in enumerate(zip(order, a_left, strict=True), start=1):
        case, png_a, png_b, shown, notes = kept[int(idx)]
        pictures.append((png_a, png_b) if left_is_a else (png_b, png_a))
        key_cases.append({
            "number": number, "case": case.case,
            "left": label_a if left_is_a else label_b, "right": label_b if left_is_a else label_a,
            "slices_axial": shown, "notes": notes,
            "files": {k: str(getattr(case, k)) for k in CASE_COLUMNS[1:]},
        })  # fmt: skip
    summary.cases = len(key_cases)
    key = {
        "format": KEY_FORMAT, "version": 1, "study": summary.study,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "labels": {"A": label_a, "B": label_b}, "seed": seed, "cases_file": str(cases_file),
        "cases": key_cases, "excluded": summary.excluded,
    }  # fmt: skip
    progress.step("writing the page")
    write_json_atomic(outdir / KEY_NAME, key)
    write_text_atomic(outdir / HTML_NAME, render_page(summary.study, pictures, title))
    return summary
