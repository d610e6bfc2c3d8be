"""deepisles reader-study: blinded build (no labels / case ids / file names in the page, balanced random sides, a key
that matches the pictures), analysis (a planted preference found, binomial p and kappas against independent
computations), bad inputs as errors or stated exclusions, and the page driven in headless Chromium (real clicks,
reload keeps the ratings, export downloads the CSV) - skipped without a Chromium, except under .ci/run
(DEEPISLES_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

from deepisles.cli import app
from deepisles.errors import DeepIslesError
from deepisles.validation import reader_study
from deepisles.validation.reader_study import (
    HTML_NAME,
    KEY_NAME,
    RATING_COLUMNS,
    balanced_sides,
    build_study,
    case_pictures,
    load_case,
    read_case_list,
)
from deepisles.validation.reader_study_analyze import analyze, cohen_kappa, fleiss_kappa, write_results

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (24, 26, 10)


def _case(folder: Path, sub: str, rng, *, empty_a=False, empty_b=False) -> list[str]:
    x, y, z = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    head = ((x - 12) / 10) ** 2 + ((y - 13) / 11) ** 2 + ((z - 5) / 5) ** 2 < 1
    c = rng.integers(8, 16, 3)
    lesion = head & ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2] // 2 - 1) ** 2 < 8)
    dwi = (head * rng.uniform(200, 300, SHAPE) + lesion * 400).astype(np.float32)
    adc = (head * rng.uniform(0.7, 0.9, SHAPE) - lesion * 0.4).astype(np.float32)
    a = np.zeros(SHAPE, np.uint8) if empty_a else lesion.astype(np.uint8)
    b = np.zeros(SHAPE, np.uint8) if empty_b else (np.roll(lesion, 2, axis=0) & head).astype(np.uint8)
    names = [f"{sub}_dwi.nii.gz", f"{sub}_adc.nii.gz", f"{sub}_msk-expertX.nii.gz", f"{sub}_msk-modelY.nii.gz"]
    for name, v in zip(names, (dwi, adc, a, b), strict=True):
        nib.save(nib.Nifti1Image(v, AFFINE), folder / name)
    return [sub, *names]


def _cohort(folder: Path, n: int, seed: int = 0, **empties) -> Path:
    """n synthetic cases and cases.csv; empties: {"empty_a": {indices}, "empty_b": {...}}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = [_case(folder, f"sub-patient{i:02d}", rng, **{k: i in v for k, v in empties.items()}) for i in range(n)]
    path = folder / "cases.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["case", "dwi", "adc", "mask_a", "mask_b"], *rows])
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("rs")
    cases = _cohort(d / "cases", 20)
    summary = build_study(cases, d / "study", label_a="expert", label_b="model", seed=987654)
    assert summary.cases == 20 and not summary.excluded and not summary.notes
    return d, json.loads((d / "study" / KEY_NAME).read_text())


def _pictures(text: str) -> list[tuple[bytes, bytes]]:
    found = re.findall(r'<img alt="(left|right)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', text)
    assert [s for s, _ in found] == ["left", "right"] * (len(found) // 2)
    pngs = [base64.b64decode(b) for _, b in found]
    return list(zip(pngs[::2], pngs[1::2], strict=True))


# ---- build -------------------------------------------------------------------------------------------------
def test_page_is_blinded_and_the_key_matches_the_pictures(study):
    d, key = study
    text = (d / "study" / HTML_NAME).read_text()
    markup = re.sub(r"(data:image/png;base64,)[A-Za-z0-9+/=]+", r"\1", text)  # the page without the pictures
    for secret in ("expert", "model", "patient", "sub-", ".nii", "msk", "cases.csv", str(d), "seed", "987654"):
        assert secret.lower() not in markup.lower(), secret
    assert key["study"] in markup and key["labels"] == {"A": "expert", "B": "model"} and key["seed"] == 987654
    html_only = re.sub(r"<script>.*?</script>", "", markup, flags=re.S)
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html_only, flags=re.I)
    assert len(refs) == 40 and all(r.startswith("data:") for r in refs), "the page refers to another file"
    assert not re.search(r"""\burl\(|@import|<(?:link|iframe|object|embed|base)\b|https?:|fetch\(|XMLHttp""", markup)

    pictures = _pictures(text)
    assert len(pictures) == 20 and [c["number"] for c in key["cases"]] == list(range(1, 21))
    order = [c["case"] for c in key["cases"]]
    assert sorted(order) == [f"sub-patient{i:02d}" for i in range(20)] and order != sorted(order)
    assert sum(c["left"] == "expert" for c in key["cases"]) == 10  # balanced sides
    for left, right in pictures:  # no text chunk (software, file names) in the pictures
        for png in (left, right):
            assert png.startswith(b"\x89PNG") and b"tEXt" not in png and b"iTXt" not in png
    # the pictures of a few cases, with source A on the left and on the right, drawn again: as the key says
    listed = {x.case: x for x in read_case_list(d / "cases" / "cases.csv")}
    few = [c for c in key["cases"] if c["left"] == "expert"][:2] + [c for c in key["cases"] if c["left"] == "model"][:2]
    for c in few:
        left, right = pictures[c["number"] - 1]
        dwi, adc, ma, mb = load_case(listed[c["case"]])
        png_a, png_b, slices = case_pictures(dwi, adc, ma, mb, 3)
        assert slices == c["slices_axial"] and png_a != png_b
        assert (left, right) == ((png_a, png_b) if c["left"] == "expert" else (png_b, png_a)), c["number"]


def test_same_seed_same_study_and_sides_are_balanced(study, tmp_path, monkeypatch):
    d, key = study
    # order and sides do not depend on the pictures: skip drawing them here (the test above checks them)
    monkeypatch.setattr(reader_study, "case_pictures", lambda *a: (b"A", b"B", [0]))
    again = build_study(d / "cases" / "cases.csv", tmp_path / "a", label_a="expert", label_b="model", seed=987654)
    key2 = json.loads((tmp_path / "a" / KEY_NAME).read_text())
    assert again.study != key["study"]  # a fresh id: nothing derived from the seed is shown to the raters
    assert [(c["case"], c["left"]) for c in key2["cases"]] == [(c["case"], c["left"]) for c in key["cases"]]
    other = build_study(d / "cases" / "cases.csv", tmp_path / "b", label_a="expert", label_b="model", seed=8)
    key3 = json.loads((tmp_path / "b" / KEY_NAME).read_text())
    assert other.cases == 20 and [c["case"] for c in key3["cases"]] != [c["case"] for c in key["cases"]]
    for n in (1, 2, 7, 20):
        for s in range(5):
            flags = balanced_sides(n, np.random.default_rng(s))
            assert len(flags) == n and sum(flags) in {n // 2, (n + 1) // 2}
    with pytest.raises(DeepIslesError, match="already holds"):
        build_study(d / "cases" / "cases.csv", tmp_path / "a", seed=987654)


def test_slices_show_both_masks_and_do_not_depend_on_which_is_which():
    a = np.zeros((6, 6, 20), bool)
    b = np.zeros_like(a)
    a[1:5, 1:5, 2:8] = True
    a[1:5, 1:5, 4] = False
    a[2, 2, 4] = True
    b[1, 1, 15] = True  # a tiny lesion only one source outlines, far from the other's
    for n in (1, 2, 3, 5):
        got = reader_study.choose_slices(a, b, n)
        assert got == reader_study.choose_slices(b, a, n) and len(got) == min(n, 7) and got == sorted(set(got))
        assert n == 1 or (15 in got and any(2 <= z < 8 for z in got)), (n, got)
    assert reader_study.choose_slices(a, b, 10) == [2, 3, 4, 5, 6, 7, 15]
    assert reader_study.choose_slices(a & False, b & False, 3) == []


def test_empty_masks_are_stated_exclusions_or_notes(tmp_path):
    cases = _cohort(tmp_path / "c", 4, empty_a={1, 2}, empty_b={2})
    s = build_study(cases, tmp_path / "s", label_a="expert", label_b="model", seed=1)
    key = json.loads((tmp_path / "s" / KEY_NAME).read_text())
    assert s.cases == 3 and len(key["cases"]) == 3
    assert s.excluded == key["excluded"] == [{"case": "sub-patient02", "reason": "both masks are empty: nothing to compare"}]
    assert s.notes == ["case sub-patient01: mask_a (expert) is empty: kept (one side shows no outline)"]
    all_empty = _cohort(tmp_path / "e", 2, empty_a={0, 1}, empty_b={0, 1})
    with pytest.raises(DeepIslesError, match="no case left to rate"):
        build_study(all_empty, tmp_path / "s2", seed=1)


def test_bad_case_lists_are_clear_errors(tmp_path):
    cases = _cohort(tmp_path, 3)
    rows = list(csv.reader(cases.open()))

    def write(rows, name="bad.csv", delim=","):
        p = tmp_path / name
        with p.open("w", newline="") as f:
            csv.writer(f, delimiter=delim).writerows(rows)
        return p

    tsv = write(rows, "cases.tsv", "\t")
    assert [c.case for c in read_case_list(tsv)] == ["sub-patient00", "sub-patient01", "sub-patient02"]
    bad = {
        "lacks the column\\(s\\) mask_b": [[c for c in r[:4]] for r in rows],
        "line 3: the files of case 'sub-patient01' name different subjects": [
            rows[0], rows[1], [*rows[2][:4], rows[1][4]]],
        "line 4: case 'sub-patient00' is listed twice": [*rows[:3], rows[1]],
        "line 2: empty adc": [rows[0], [rows[1][0], rows[1][1], "", *rows[1][3:]]],
        "mask_b of case 'sub-patient00' .* not found": [rows[0], [*rows[1][:4], "nothere.nii.gz"]],
        "same file": [rows[0], [*rows[1][:4], rows[1][3]]],
        "no cases": rows[:1],
    }
    for why, content in bad.items():
        with pytest.raises(DeepIslesError, match=why):
            read_case_list(write(content))
    # a mask on a grid that does not overlap the DWI
    far = tmp_path / "sub-patient00_far.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.uint8), np.diag([2.0, 2, 3, 1]) + np.c_[np.zeros((4, 3)), [900, 0, 0, 0]]), far)
    with pytest.raises(DeepIslesError, match="do not overlap"):
        build_study(write([rows[0], [*rows[1][:4], far.name]]), tmp_path / "s", seed=0)
    with pytest.raises(DeepIslesError, match="two different"):
        build_study(cases, tmp_path / "s", label_a="model", label_b="model")


# ---- analyze -----------------------------------------------------------------------------------------------
def _side_of(case: dict, source: str) -> str:
    return "left" if case["left"] == source else "right"


def _ratings_csv(path: Path, key: dict, rater: str, choices: dict[int, str], scores=None, study=None) -> Path:
    """choices: case number -> 'expert' | 'model' | 'none' | '' (unblinded; turned into the shown side);
    scores: case number -> {source: 1-5}."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(RATING_COLUMNS)
        for c in key["cases"]:
            want = choices.get(c["number"], "")
            choice = want if want in ("none", "") else _side_of(c, want)
            sc = (scores or {}).get(c["number"], {})
            w.writerow([study or key["study"], rater, c["number"], choice, sc.get(c["left"], ""),
                        sc.get(c["right"], ""), "2026-01-01T00:00:00Z"])
    return path


def test_planted_preference_is_found(study, tmp_path):
    d, key = study
    choices = {n: ("expert" if n in (3, 11) else "model") for n in range(1, 21)}  # model in 18 of 20
    scores = {n: {"expert": 2, "model": 4} for n in range(1, 11)}
    path = _ratings_csv(tmp_path / "r1.csv", key, "Dr A", choices, scores)
    res = analyze(d / "study" / KEY_NAME, [path])
    t = res["raters"]["Dr A"]
    assert t["prefer"] == {"expert": 2, "model": 18} and t["share"]["model"] == 0.9 and t["skipped"] == 0
    p_exact = 2 * sum(math.comb(20, k) for k in range(18, 21)) / 2**20  # independent: the binomial tail
    assert t["binomial_p"] == pytest.approx(p_exact, rel=1e-12)
    assert t["binomial_p"] == pytest.approx(binomtest(18, 20, 0.5).pvalue, rel=1e-12) and t["binomial_p"] < 0.001
    assert t["mean_score"] == {"expert": 2.0, "model": 4.0} and t["scored"] == {"expert": 10, "model": 10}
    n_left = sum(_side_of(c, choices[c["number"]]) == "left" for c in key["cases"])
    assert t["left_chosen"] == n_left / 20
    assert res["agreement"]["kappa"] is None and res["overall"]["prefer"] == t["prefer"]

    # a rater without a preference: not significant
    even = {n: ("expert" if n % 2 else "model") for n in range(1, 21)}
    res = analyze(d / "study" / KEY_NAME, [path, _ratings_csv(tmp_path / "r2.csv", key, "Dr B", even)])
    assert res["raters"]["Dr B"]["share"]["model"] == 0.5 and res["raters"]["Dr B"]["binomial_p"] == 1.0
    assert res["overall"]["prefer"] == {"expert": 12, "model": 28}
    assert res["overall"]["binomial_p"] == pytest.approx(binomtest(12, 40).pvalue)
    out = write_results(res, tmp_path / "out")
    rows = list(csv.DictReader(out[1].open()))
    assert [r["rater"] for r in rows] == ["Dr A", "Dr B", "overall"] and rows[0]["prefer_model"] == "18"
    assert json.loads(out[0].read_text())["raters"]["Dr A"]["prefer"]["model"] == 18


def _cohen_independent(a, b):
    cats = sorted(set(a) | set(b))
    m = np.array([[sum(x == i and y == j for x, y in zip(a, b, strict=True)) for j in cats] for i in cats], float)
    m /= m.sum()
    pe = m.sum(1) @ m.sum(0)
    return (np.trace(m) - pe) / (1 - pe)


def test_kappas_against_published_examples_and_independent_computation(study, tmp_path):
    # Cohen (1960) as in Wikipedia's example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # Fleiss (1971) as in Wikipedia's worked example: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]  # fmt: skip
    assert fleiss_kappa(np.array(table)) == pytest.approx(0.20993, abs=1e-5)
    assert cohen_kappa(["x"] * 5, ["x"] * 5) is None  # chance agreement 1: undefined, not 0 or nan

    d, key = study
    rng = np.random.default_rng(3)
    picks = [{n: str(rng.choice(["expert", "model", "none"])) for n in range(1, 21)} for _ in range(3)]
    picks[1][5] = ""  # rater 2 skipped case 5: agreement uses the 19 cases every rater decided
    files = [_ratings_csv(tmp_path / f"r{i}.csv", key, f"R{i}", p) for i, p in enumerate(picks)]
    lab = {"expert": "expert", "model": "model", "none": "no preference"}
    common = [n for n in range(1, 21) if n != 5]
    res = analyze(d / "study" / KEY_NAME, files[:2])
    assert res["agreement"]["method"] == "Cohen's kappa" and res["agreement"]["cases"] == 19
    ref = _cohen_independent([lab[picks[0][n]] for n in common], [lab[picks[1][n]] for n in common])
    assert res["agreement"]["kappa"] == pytest.approx(ref)
    assert res["raters"]["R1"]["skipped"] == 1

    res = analyze(d / "study" / KEY_NAME, files)
    assert res["agreement"]["method"] == "Fleiss' kappa"
    # independent Fleiss: mean pairwise agreement per case vs chance from the pooled category shares
    rows = [[lab[p[n]] for p in picks] for n in common]
    p_i = [sum(x == y for i, x in enumerate(r) for j, y in enumerate(r) if i != j) / 6 for r in rows]
    share = {c: sum(r.count(c) for r in rows) / (3 * len(rows)) for c in lab.values()}
    pe = sum(v * v for v in share.values())
    assert res["agreement"]["kappa"] == pytest.approx((np.mean(p_i) - pe) / (1 - pe))


def test_ratings_that_do_not_match_the_key(study, tmp_path):
    d, key = study
    k = d / "study" / KEY_NAME
    good = _ratings_csv(tmp_path / "good.csv", key, "Dr A", {n: "model" for n in range(1, 21)})
    lines = good.read_text().splitlines()

    def variant(name, text):
        (tmp_path / name).write_text(text)
        return tmp_path / name

    cases = {
        "lacks the column\\(s\\) choice": "\n".join(",".join(x.split(",")[:3]) for x in lines),
        "study 'abc' is not the key's study": "\n".join([lines[0], lines[1].replace(key["study"], "abc")]),
        "case '21' is not a case number": "\n".join([lines[0], re.sub(r",\d+,", ",21,", lines[1], count=1)]),
        "choice 'better' is not one of": "\n".join([lines[0], re.sub(r",(left|right),", ",better,", lines[1])]),
        "score '7' is not one of 1-5": "\n".join([lines[0], lines[1].replace(",,", ",7,", 1)]),
        "empty rater name": "\n".join([lines[0], lines[1].replace("Dr A", "")]),
        "rated case 1 twice, differently": "\n".join([*lines, re.sub(r",(left|right),", ",none,", lines[1])]),
        "no rows": lines[0],
    }
    for why, text in cases.items():
        with pytest.raises(DeepIslesError, match=why):
            analyze(k, [variant("bad.csv", text)])
    with pytest.raises(DeepIslesError, match="key is not JSON"):
        analyze(good, [good])
    with pytest.raises(DeepIslesError, match="not a reader-study key"):
        analyze(variant("other.json", '{"format": "something else"}'), [good])
    # the same file twice: merged and said so; a partial file: the absent cases are counted as skipped, said so
    res = analyze(k, [good, good])
    assert res["raters"]["Dr A"]["prefer"]["model"] == 20 and "counted once" in res["notes"][0]
    res = analyze(k, [variant("part.csv", "\n".join(lines[:6]))])
    assert res["raters"]["Dr A"]["skipped"] == 15 and "15 of 20 case(s) absent" in res["notes"][0]


def test_cli_build_and_analyze(tmp_path):
    runner = CliRunner()
    cases = _cohort(tmp_path / "c", 3, empty_a={0}, empty_b={0})
    r = runner.invoke(app, ["reader-study", "build", "--cases", str(cases), "-o", str(tmp_path / "s"),
                            "--label-a", "expert", "--label-b", "model", "--seed", "2"])
    assert r.exit_code == 0, r.output
    assert "2 case(s)" in r.output and "excluded: case sub-patient00: both masks are empty" in r.output
    key = json.loads((tmp_path / "s" / KEY_NAME).read_text())
    ratings = _ratings_csv(tmp_path / "r.csv", key, "Dr A", {1: "model", 2: "model"})
    r = runner.invoke(app, ["reader-study", "analyze", "--key", str(tmp_path / "s" / KEY_NAME), str(ratings),
                            "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "prefer_model" in r.output and "excluded at build" in r.output
    assert (tmp_path / "out" / "reader_study.csv").is_file()
    r = runner.invoke(app, ["reader-study", "analyze", "--key", str(ratings), str(ratings)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "error:" in r.output


# ---- in a browser ------------------------------------------------------------------------------------------
REQUIRE_BROWSER = "DEEPISLES_REQUIRE_BROWSER"  # set by .ci/run: there, no Chromium is a failure, not a skip


def _chromium() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "screenshot_report", Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    exe = mod.find_chromium()
    if exe is None:
        why = f"no Chromium binary found (apt-get install {mod.APT_PACKAGE}, or set $CHROMIUM)"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{why}; ${REQUIRE_BROWSER}=1 requires the browser test to run")
        pytest.skip(why)
    return exe


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on fd 3,
    replies on fd 4, NUL-terminated JSON): no extra package, no port. Network cut off."""

    def __init__(self, exe: str, profile: str):
        cmd_r, self._cmd_w = os.pipe()
        self._rep_r, rep_w = os.pipe()

        def fds():  # in the child: the pipe ends onto fds 3 and 4
            os.dup2(cmd_r, 3)
            os.dup2(rep_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
             f"--user-data-dir={profile}", "--window-size=1100,900", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(cmd_r)
        os.close(rep_w)
        self._buf, self._id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None, session: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._rep_r, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && document.documentElement.dataset.cases !== undefined")

    def js(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > end:
                raise TimeoutError(expression)
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A real mouse click (press + release) at the element's centre, after scrolling it into view."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView("
                       "{block: 'center'}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, "
                       "r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self._cmd_w)
            os.close(self._rep_r)


def test_rating_in_headless_chromium_reload_and_export(tmp_path):
    exe = _chromium()
    cases = _cohort(tmp_path / "c", 4)
    build_study(cases, tmp_path / "s", label_a="expert", label_b="model", seed=5)
    key = json.loads((tmp_path / "s" / KEY_NAME).read_text())
    url = (tmp_path / "s" / HTML_NAME).resolve().as_uri()
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with tempfile.TemporaryDirectory(prefix="deepisles-rs-chromium-") as profile:
        b = Browser(exe, profile)
        try:
            b.send("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}, session=False)
            b.open(url)
            assert b.js("document.getElementById('progress').textContent") == "0 / 4 rated"
            # case 1: left; case 2: right, then scores; case 3: no preference; case 4: clicked twice = cleared
            b.click("#case-1 button[data-choice=left]")
            b.click("#case-2 button[data-choice=right]")
            b.click("#case-3 button[data-choice=none]")
            b.click("#case-4 button[data-choice=left]")
            b.click("#case-4 button[data-choice=left]")
            b.js("""(() => { const s = document.querySelector('#case-2 select[data-score=left]'); s.value = '2';
                     s.dispatchEvent(new Event('change')); })()""")
            assert b.js("document.documentElement.dataset.rated") == "3"
            assert b.js("document.querySelector('#case-1 button[data-choice=left]').getAttribute('aria-pressed')") == "true"
            b.click("#export")  # no rater name yet: refused, with a message
            assert "enter your name" in b.js("document.getElementById('message').textContent")
            assert b.js("document.documentElement.dataset.exported") == ""

            b.send("Page.reload")  # the ratings survive a reload (localStorage)
            b.wait("document.readyState === 'complete' && document.documentElement.dataset.rated === '3'")
            assert b.js("document.querySelector('#case-2 select[data-score=left]').value") == "2"
            assert b.js("document.getElementById('progress').textContent") == "3 / 4 rated"
            b.click("#rater")
            b.send("Input.insertText", {"text": 'Dr "Q", MD'})
            b.click("#export")
            b.wait("document.documentElement.dataset.exported === '4'")
            shown = b.js("document.getElementById('export-area').value")
            end = time.monotonic() + 15
            while not (files := [p for p in downloads.iterdir() if p.suffix == ".csv"]) and time.monotonic() < end:
                time.sleep(0.1)
        finally:
            b.close()
    assert len(files) == 1 and files[0].name == f"ratings_Dr_Q_MD_{key['study']}.csv"
    text = files[0].read_text()
    assert text == shown
    rows = list(csv.DictReader(text.splitlines()))
    assert [(r["case"], r["choice"], r["score_left"]) for r in rows] == [
        ("1", "left", ""), ("2", "right", "2"), ("3", "none", ""), ("4", "", "")]
    assert {r["rater"] for r in rows} == {'Dr "Q", MD'} and {r["study"] for r in rows} == {key["study"]}
    assert all(r["time"] for r in rows[:3])

    res = analyze(tmp_path / "s" / KEY_NAME, [files[0]])
    t = res["raters"]['Dr "Q", MD']
    c1, c2 = key["cases"][0], key["cases"][1]
    want = {"expert": 0, "model": 0}
    want[c1["left"]] += 1
    want[c2["right"]] += 1
    assert t["prefer"] == want and t["no_preference"] == 1 and t["skipped"] == 1
    assert t["mean_score"][c2["left"]] == 2.0
