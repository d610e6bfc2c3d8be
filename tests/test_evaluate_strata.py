"""`deepisles evaluate --by ...`: stratified evaluation on a synthetic cohort whose expected statistics are
computed here, independently, with numpy (the masks are built from known boxes; volumes, counts, Dice and F1
follow from the design)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from deepisles import api
from deepisles.cli import app
from deepisles.errors import DeepIslesError
from deepisles.validation import strata as S

SHAPE = (40, 40, 24)
SPACING = 3.0  # mm -> 0.027 mL per voxel
VOX_ML = SPACING**3 / 1000.0
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
METRICS = ("dice", "abs_volume_diff_ml", "abs_lesion_count_diff", "lesion_f1")

# per case: reference lesions as box sizes (x, y, z), predicted slices kept of each (along z, from the start),
# extra false-positive boxes; manufacturer of the DWI sidecar (None: no field, "nosidecar": no file); site in
# participants.tsv (None: subject not listed, "n/a": listed without a value)
COHORT = {
    "sub-a01": ([(3, 3, 2)], [1], 0, "Siemens", "A"),  # 0.49 mL
    "sub-a02": ([(5, 5, 4)], [4], 1, "Siemens", "A"),  # 2.7 mL, one FP
    "sub-a03": ([(7, 7, 8)], [5], 0, "GE", "B"),  # 10.6 mL
    "sub-a04": ([(11, 11, 12)], [12], 0, "GE", "B"),  # 39.2 mL
    "sub-a05": ([(14, 14, 16)], [10], 2, "Philips", "n/a"),  # 84.7 mL
    "sub-a06": ([(3, 3, 3)] * 3, [3, 0, 2], 0, "Philips", "A"),  # 3 lesions, one missed
    "sub-a07": ([(2, 2, 2)] * 7, [2, 2, 2, 2, 0, 0, 1], 1, None, "C"),  # 7 lesions
    "sub-a08": ([(4, 4, 4)] * 2, [4, 4], 0, "nosidecar", "C"),  # 2 lesions
    "sub-a09": ([], [], 0, "Siemens", None),  # empty reference, empty prediction
    "sub-a10": ([], [], 1, "GE", "B"),  # empty reference, a false positive
    "sub-a11": ([(6, 6, 6)], [0], 0, "Siemens", "A"),  # missed entirely
}


def _boxes(sizes, origin_y):
    """Place boxes along x with one empty voxel between them (separate 26-connected components)."""
    x, out = 1, []
    for sx, sy, sz in sizes:
        out.append((slice(x, x + sx), slice(origin_y, origin_y + sy), slice(1, 1 + sz)))
        x += sx + 1
    return out


def _build(spec):
    sizes, kept, n_fp, _, _ = spec
    gt = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    boxes = _boxes(sizes, origin_y=1)
    assert all(b[0].stop <= SHAPE[0] for b in boxes)
    for b, k in zip(boxes, kept, strict=True):
        gt[b] = 1
        if k:
            pred[b[0], b[1], slice(b[2].start, b[2].start + k)] = 1
    for i in range(n_fp):  # far from the lesions (y >= 20)
        pred[1 + 4 * i : 3 + 4 * i, 22:24, 18:20] = 1
    tp = sum(1 for k in kept if k)
    fn, fp = len(sizes) - tp, n_fp
    n_g, n_p = int(gt.sum()), int(pred.sum())
    expected = {
        "dice": 1.0 if n_g + n_p == 0 else 2.0 * int((gt & pred).sum()) / (n_g + n_p),
        "abs_volume_diff_ml": abs(n_g - n_p) * VOX_ML,
        "abs_lesion_count_diff": abs(len(sizes) - (tp + fp)),
        "lesion_f1": 1.0 if tp + fp + fn == 0 else tp / (tp + (fp + fn) / 2),
        "ref_volume_ml": n_g * VOX_ML,
        "pred_volume_ml": n_p * VOX_ML,
        "ref_lesion_count": len(sizes),
    }
    return gt, pred, expected


def _save(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    ds, preds = root / "ds", root / "preds"
    expected = {}
    tsv = ["participant_id\tsite\tage"]
    for i, (sub, spec) in enumerate(COHORT.items()):
        gt, pred, exp = _build(spec)
        ses = "ses-0001"
        _save(ds / "derivatives" / sub / ses / f"{sub}_{ses}_msk.nii.gz", gt)
        _save(preds / f"{sub}_pred.nii.gz", pred)
        raw = ds / "rawdata" / sub / ses / "dwi"
        for role in ("dwi", "adc"):
            _save(raw / f"{sub}_{ses}_{role}.nii.gz", np.ones(SHAPE, np.float32))
        manufacturer, site = spec[3], spec[4]
        if manufacturer != "nosidecar":
            side = {"MagneticFieldStrength": 3 if i % 2 else 1.5, "RepetitionTime": 5.0}
            if manufacturer is not None:
                side["Manufacturer"] = manufacturer
            (raw / f"{sub}_{ses}_dwi.json").write_text(json.dumps(side))
        if site is not None:
            tsv.append(f"{sub}\t{site}\t{50 + i}")
        expected[sub] = exp
    tsv.append("sub-zz99\tA\t70")  # a participant without a case: stated, not an error
    (ds / "rawdata" / "participants.tsv").write_text("\n".join(tsv) + "\n")
    return {"ds": ds, "preds": preds, "expected": expected}


def _stats(values, key=None):
    v = np.asarray(values, float)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"n": v.size, "median": med, "q1": q1, "q3": q3, "mean": v.mean()}


def _check_stratum(got: dict, cases: list[str], expected: dict) -> None:
    assert sorted(got["cases"]) == sorted(cases)
    assert got["n"] == len(cases)
    for m in METRICS:
        want = _stats([expected[c][m] for c in cases])
        for k in ("median", "q1", "q3", "mean"):
            assert got["metrics"][m][k] == pytest.approx(want[k], abs=1e-9), (got["stratum"], m, k)
        lo, hi = got["metrics"][m]["ci_low"], got["metrics"][m]["ci_high"]
        if len(cases) >= 2:
            assert lo - 1e-12 <= want["mean"] <= hi + 1e-12
        else:
            assert lo is None and hi is None  # no interval from one case


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "strata"
    rows, summary = api.evaluate(cohort["preds"], cohort["ds"], by=("volume", "count", "Manufacturer", "site",
                                 "MagneticFieldStrength"), out_dir=out, bootstrap=500, seed=7)  # fmt: skip
    return {"rows": rows, "summary": summary, "out": out}


def test_per_case_volumes_and_metrics_follow_the_design(cohort, run):
    assert [r["case"] for r in run["rows"]] == sorted(COHORT)
    for r in run["rows"]:
        exp = cohort["expected"][r["case"]]
        for k, v in exp.items():
            assert r[k] == pytest.approx(v, abs=1e-9), (r["case"], k)


def test_volume_and_count_strata_equal_numpy(cohort, run):
    exp = cohort["expected"]
    report = run["summary"]["strata"]
    vols = {c: e["ref_volume_ml"] for c, e in exp.items()}
    edges = np.array([1, 5, 20, 70])
    names = ["<1 mL", "1-5 mL", "5-20 mL", "20-70 mL", ">=70 mL"]
    want = {n: [] for n in names}
    want["empty reference"] = []
    for c, v in vols.items():
        want["empty reference" if v == 0 else names[np.digitize(v, edges)]].append(c)
    got = {s["stratum"]: s for s in report["by"]["volume"]["strata"]}
    assert list(got) == [*names, "empty reference"]
    for name, cases in want.items():
        if cases:
            _check_stratum(got[name], cases, exp)
        else:
            assert got[name]["n"] == 0
    counts = {c: e["ref_lesion_count"] for c, e in exp.items()}
    want_c = {"1": [c for c, n in counts.items() if n == 1], "2-5": [c for c, n in counts.items() if 2 <= n <= 5],
              ">5": [c for c, n in counts.items() if n > 5], "empty reference": [c for c, n in counts.items() if n == 0]}
    got_c = {s["stratum"]: s for s in report["by"]["count"]["strata"]}
    assert list(got_c) == list(want_c)
    for name, cases in want_c.items():
        _check_stratum(got_c[name], cases, exp)
    overall = report["overall"]
    for m in METRICS:
        assert overall[m]["mean"] == pytest.approx(np.mean([e[m] for e in exp.values()]))
        assert overall[m]["n"] == len(exp)


def test_attribute_strata_and_n_a_are_counted_with_reasons(cohort, run):
    exp = cohort["expected"]
    by = run["summary"]["strata"]["by"]
    man = {s["stratum"]: s for s in by["Manufacturer"]["strata"]}
    assert list(man) == ["GE", "Philips", "Siemens", "n/a"]
    for name in ("GE", "Philips", "Siemens"):
        _check_stratum(man[name], [c for c, spec in COHORT.items() if spec[3] == name], exp)
    _check_stratum(man["n/a"], ["sub-a07", "sub-a08"], exp)
    assert by["Manufacturer"]["source"] == "DWI sidecar"
    assert "no Manufacturer" in by["Manufacturer"]["n_a"]["sub-a07"]
    assert "no JSON sidecar" in by["Manufacturer"]["n_a"]["sub-a08"]
    site = {s["stratum"]: s for s in by["site"]["strata"]}
    assert list(site) == ["A", "B", "C", "n/a"]
    _check_stratum(site["n/a"], ["sub-a05", "sub-a09"], exp)
    assert by["site"]["n_a"] == {"sub-a05": "missing value (n/a) in participants.tsv",
                                 "sub-a09": "not in participants.tsv"}
    field = {s["stratum"]: s for s in by["MagneticFieldStrength"]["strata"]}
    assert list(field) == ["1.5", "3", "n/a"]  # numeric order; 3 and 3.0 are one stratum
    for block in by.values():  # every case in exactly one stratum: nothing dropped
        assert sorted(c for s in block["strata"] for c in s["cases"]) == sorted(COHORT)
    assert run["summary"]["strata"]["attributes"]["participants_without_case"] == ["sub-zz99"]


def test_bland_altman_equals_numpy(cohort, run):
    exp = cohort["expected"]
    ba = run["summary"]["strata"]["bland_altman"]
    diff = np.array([e["pred_volume_ml"] - e["ref_volume_ml"] for e in exp.values()])
    bias, sd = diff.mean(), diff.std(ddof=1)
    assert ba["n"] == len(exp)
    assert ba["bias_ml"] == pytest.approx(bias)
    assert ba["loa_low_ml"] == pytest.approx(bias - 1.96 * sd)
    assert ba["loa_high_ml"] == pytest.approx(bias + 1.96 * sd)


def test_files_written_and_consistent(cohort, run):
    out = run["out"]
    for name in ("cases.csv", "strata.csv", "strata.json", "bland_altman.png", "strata_volume.png",
                 "strata_count.png", "strata_Manufacturer.png", "strata_site.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    on_disk = json.loads((out / "strata.json").read_text())
    assert on_disk["by"]["volume"] == run["summary"]["strata"]["by"]["volume"]
    with open(out / "strata.csv") as f:
        table = list(csv.DictReader(f))
    row = next(r for r in table if r["by"] == "count" and r["stratum"] == "2-5" and r["metric"] == "dice")
    cases = [c for c, e in cohort["expected"].items() if 2 <= e["ref_lesion_count"] <= 5]
    assert int(row["n"]) == len(cases)
    assert float(row["median"]) == pytest.approx(np.median([cohort["expected"][c]["dice"] for c in cases]))
    with open(out / "cases.csv") as f:
        per_case = {r["case"]: r for r in csv.DictReader(f)}
    assert per_case["sub-a09"]["volume"] == "empty reference" and per_case["sub-a09"]["site"] == "n/a"
    assert float(per_case["sub-a04"]["ref_volume_ml"]) == pytest.approx(11 * 11 * 12 * VOX_ML)


def test_bootstrap_is_seeded_and_covers_the_true_mean():
    rng = np.random.default_rng(123)
    values = rng.normal(0.6, 0.15, 300)  # population mean 0.6
    a = S.describe(values, 2000, seed=1, key="k")
    assert a == S.describe(values, 2000, seed=1, key="k")  # reproducible
    b = S.describe(values, 2000, seed=2, key="k")
    assert (a["ci_low"], a["ci_high"]) != (b["ci_low"], b["ci_high"])
    assert a["ci_low"] < 0.6 < a["ci_high"]
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)  # normal approximation of the mean's 95 % CI
    assert a["ci_low"] == pytest.approx(values.mean() - half, abs=0.2 * half)
    assert a["ci_high"] == pytest.approx(values.mean() + half, abs=0.2 * half)
    assert np.isnan(S.describe(values[:1], 2000, 0, "k")["ci_low"])
    assert np.isnan(S.describe(values, 0, 0, "k")["ci_low"])


def test_same_seed_same_report_and_bins_options(cohort, run, tmp_path):
    def report(seed):
        return S.StrataPlan(by=("volume", "count"), out_dir=tmp_path, resamples=200, seed=seed).stratify(run["rows"])

    s1, s2, s3 = report(3), report(3), report(4)
    assert s1["by"] == s2["by"] and s1["by"] != s3["by"]
    assert s1["by"]["volume"]["strata"][1]["metrics"]["dice"]["ci_low"] != s3["by"]["volume"]["strata"][1][
        "metrics"]["dice"]["ci_low"]  # fmt: skip
    vol = run["summary"]["strata"]["by"]["volume"]["strata"]  # seed 7, 500 resamples: depends on seed and name only
    again = S.StrataPlan(by=("count", "volume"), out_dir=tmp_path, resamples=500, seed=7).stratify(run["rows"])
    assert again["by"]["volume"]["strata"] == vol
    _, s = api.evaluate(cohort["preds"], cohort["ds"], out_dir=tmp_path / "d", by=("volume", "count"),
                        volume_bins="10", count_bins="1,2,5", bootstrap=0)  # fmt: skip
    assert [x["stratum"] for x in s["strata"]["by"]["volume"]["strata"]] == ["<10 mL", ">=10 mL", "empty reference"]
    assert [x["stratum"] for x in s["strata"]["by"]["count"]["strata"]] == ["1", "2", "3-5", ">5", "empty reference"]
    assert s["strata"]["overall"]["dice"]["ci_low"] is None  # --bootstrap 0: no intervals


def test_bin_labels():
    assert S.volume_stratum(0.999, (1, 5)) == "<1 mL" and S.volume_stratum(1.0, (1, 5)) == "1-5 mL"
    assert S.volume_stratum(5.0, (1, 5)) == ">=5 mL" and S.volume_stratum(0.0, (1, 5)) == "empty reference"
    assert S.count_stratum(5, (1, 5)) == "2-5" and S.count_stratum(6, (1, 5)) == ">5"
    for bad in ("5,1", "0,1", "a", "1,,2", "nan"):
        with pytest.raises(DeepIslesError, match="--volume-bins"):
            S.parse_bins(bad, "--volume-bins", integer=False)
    with pytest.raises(DeepIslesError, match="--count-bins"):
        S.parse_bins("1.5", "--count-bins", integer=True)


runner = CliRunner()


def _cli(args):
    return runner.invoke(app, ["evaluate", *(str(a) for a in args)])


def _one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_prints_strata_and_writes(cohort, tmp_path):
    res = _cli(["--pred", cohort["preds"], "--gt", cohort["ds"], "--by", "volume", "--by", "site",
                "--out-dir", tmp_path / "o", "--bootstrap", "100"])  # fmt: skip
    assert res.exit_code == 0, res.stderr
    assert "by volume" in res.stdout and "by site" in res.stdout and "Bland-Altman" in res.stdout
    assert "2 case(s) in n/a" in res.stderr and "sub-zz99" in res.stderr
    assert (tmp_path / "o" / "strata_site.png").is_file()
    again = _cli(["--pred", cohort["preds"], "--gt", cohort["ds"], "--by", "volume", "--out-dir", tmp_path / "o"])
    _one_line_error(again, "already holds results", "--overwrite")


def test_cli_bad_inputs_are_one_line_errors(cohort, tmp_path):
    base = ["--pred", cohort["preds"], "--gt", cohort["ds"]]
    res = _cli([*base, "--by", "Scanner", "--out-dir", tmp_path / "o"])
    _one_line_error(res, "--by Scanner", "available: volume, count, site, age", "Manufacturer")
    assert not (tmp_path / "o").exists()  # refused before anything was written
    _one_line_error(_cli([*base, "--by", "volume"]), "--out-dir")
    _one_line_error(_cli([*base, "--by", "volume", "--out-dir", tmp_path / "o", "--volume-bins", "5,1"]),
                    "--volume-bins 5,1")  # fmt: skip
    flat = cohort["ds"] / "derivatives" / "sub-a01" / "ses-0001"
    one_pred = cohort["preds"] / "sub-a01_pred.nii.gz"
    gt_file = flat / "sub-a01_ses-0001_msk.nii.gz"
    res = _cli(["--pred", one_pred, "--gt", gt_file, "--by", "site", "--out-dir", tmp_path / "o"])
    assert res.exit_code == 0, res.stderr  # a file inside derivatives/: its dataset is found
    other = tmp_path / "flat"
    other.mkdir()
    (other / "m.nii.gz").write_bytes(gt_file.read_bytes())
    res = _cli(["--pred", one_pred, "--gt", other / "m.nii.gz", "--by", "site", "--out-dir", tmp_path / "o2"])
    _one_line_error(res, "--dataset")


def test_bad_participants_tsv(cohort, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(cohort["ds"], ds)
    tsv = ds / "rawdata" / "participants.tsv"
    for text, needle in (("subject\tsite\nsub-a01\tA\n", "no participant_id column"),
                         ("participant_id\tsite\nsub-a01\tA\nsub-a01\tB\n", "listed twice"),
                         ("participant_id\tsite\nsub-a01\tA\textra\n", "line 2 has 3 fields")):  # fmt: skip
        tsv.write_text(text)
        res = _cli(["--pred", cohort["preds"], "--gt", ds, "--by", "site", "--out-dir", tmp_path / "o"])
        _one_line_error(res, "participants.tsv", needle)


def test_bids_layout_without_sessions_and_mismatched_subjects(tmp_path):
    ds, preds = tmp_path / "bids", tmp_path / "preds"
    gt, pred, _ = _build(COHORT["sub-a02"])
    for sub, vendor in (("sub-01", "GE"), ("sub-02", "Siemens")):
        _save(ds / "derivatives" / "lesions" / sub / "anat" / f"{sub}_msk.nii.gz", gt)
        _save(preds / sub / "mask.nii.gz", pred)
        for role in ("dwi", "adc"):
            _save(ds / sub / "dwi" / f"{sub}_{role}.nii.gz", np.ones(SHAPE, np.float32))
        (ds / sub / "dwi" / f"{sub}_dwi.json").write_text(json.dumps({"Manufacturer": vendor}))
    (ds / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tx\nsub-02\ty\n")
    _, s = api.evaluate(preds, ds / "derivatives", by=("Manufacturer", "group"), out_dir=tmp_path / "o",
                        bootstrap=10)  # fmt: skip
    assert [x["stratum"] for x in s["strata"]["by"]["Manufacturer"]["strata"]] == ["GE", "Siemens"]
    assert [x["n"] for x in s["strata"]["by"]["group"]["strata"]] == [1, 1]
    (preds / "sub-02" / "mask.nii.gz").unlink()
    res = _cli(["--pred", preds, "--gt", ds, "--by", "group", "--out-dir", tmp_path / "o2"])
    _one_line_error(res, "no prediction for 1 of 2", "sub-02")
