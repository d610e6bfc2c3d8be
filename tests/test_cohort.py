"""deepisles cohort on a synthetic batch output: every expected number is computed here, independently."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy import stats
from typer.testing import CliRunner

from deepisles.cli import app
from deepisles.io.hashing import sha256_file
from deepisles.outputs.bids import CaseNames, cohort_row, cohort_tsv, mask_sidecar
from deepisles.validation.cohort import bootstrap_spearman, run_cohort
from deepisles.validation.cohort_mni import map_grid, warp_to_mni

N = 40
SEED = 7
IDENTITY = np.eye(4)
# MNI mm centres of the planted lesions (left and right MCA territory, deep grey matter)
CENTRES = np.array([[-30.0, 0.0, 10.0], [32.0, -10.0, 14.0], [-24.0, 6.0, 2.0]])


def _volume_voxels(z: np.ndarray) -> np.ndarray:
    return np.rint(1 + 1500 * stats.norm.cdf(z)).astype(int)


def _nihss(z: np.ndarray, e: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(8 + 6 * (0.7 * z + np.sqrt(1 - 0.49) * e)), 0, 42)


_ORDER: dict[tuple, np.ndarray] = {}


def _ball(k: int, centre_mni: np.ndarray, shape, grid) -> np.ndarray:
    """The k voxels of the map grid nearest to centre_mni (ties by index), as a bool mask."""
    key = tuple(centre_mni)
    if key not in _ORDER:
        ijk = np.indices(shape).reshape(3, -1).T
        mm = ijk @ grid[:3, :3].T + grid[:3, 3]
        d = ((mm - centre_mni) ** 2).sum(axis=1)
        near = np.flatnonzero(d < 30.0**2)  # a 30 mm ball holds > 3000 voxels of 2 mm
        _ORDER[key] = near[np.argsort(d[near], kind="stable")]
    out = np.zeros(int(np.prod(shape)), bool)
    out[_ORDER[key][:k]] = True
    return out.reshape(shape)


def _write_case(root: Path, pid: str, mask: np.ndarray, affine: np.ndarray, registration: dict) -> dict:
    names = CaseNames(pid, None)
    folder = root / names.folder
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / names.mask)
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), folder / names.probseg)
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), folder / names.agreement)
    (folder / names.probseg_json).write_text("{}")
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    count = int(ndi.label(mask, np.ones((3, 3, 3)))[1])
    report = {"tool": {"version": "test"}, "members": {"run": [{"name": "classical"}], "skipped": []},
              "ensemble": {"rule": "majority"}, "lesions": {"volume_ml": float(mask.sum() * voxel_ml), "count": count},
              "location": {"registration": registration}}  # fmt: skip
    (folder / names.report).write_text(json.dumps(report))
    sums = {n: sha256_file(folder / n)
            for n in (names.mask, names.probseg, names.agreement, names.probseg_json, names.report)}
    sidecar = mask_sidecar(report, [], sums)
    (folder / names.mask_json).write_text(json.dumps(sidecar))
    return cohort_row(names, "ok", sidecar, report)


def _reg(matrix=IDENTITY) -> dict:
    return {"ok": True, "matrix_ras_to_mni": np.asarray(matrix).tolist(), "brain_dice": 0.95}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("cohort"))


def build_cohort(tmp: Path, n_boot: int = 2000) -> dict:
    """A batch output of N planted subjects + special cases, participants.tsv, reference masks; runs the cohort
    statistics into tmp/out (also how docs/validation.md's pictures were made)."""
    root, ref = tmp / "batch", tmp / "dataset"
    shape, grid = map_grid()
    rng = np.random.default_rng(SEED)
    z, e = rng.standard_normal(N), rng.standard_normal(N)
    k = _volume_voxels(z)
    nihss = _nihss(z, e)
    mrs = np.clip(np.rint(2 + 1.2 * z + rng.standard_normal(N)), 0, 6)
    rows, masks, clinical = [], {}, []
    for i in range(N):
        pid = f"sub-{i:03d}"
        mask = _ball(int(k[i]), CENTRES[i % 3], shape, grid)
        if i % 4 == 0:  # a second, separate lesion: counts 1 and 2
            mask |= _ball(5, CENTRES[(i + 1) % 3], shape, grid)
        masks[pid] = mask
        rows.append(_write_case(root, pid, mask, grid, _reg()))
        clinical.append((pid, f"{nihss[i]:g}", f"{mrs[i]:g}"))
        # expert mask: the predicted one grown or shrunk by a random amount (a different volume ranking)
        expert = _ball(max(1, int(k[i] * np.exp(0.6 * rng.standard_normal()))), CENTRES[i % 3], shape, grid)
        (ref / "derivatives" / pid).mkdir(parents=True)
        nib.save(nib.Nifti1Image(expert.astype(np.uint8), grid), ref / "derivatives" / pid / f"{pid}_msk.nii.gz")
        masks[pid + "_expert"] = expert
    # special cases
    empty = np.zeros(shape, bool)
    rows.append(_write_case(root, "sub-900", empty, grid, {"skipped": "no lesion"}))  # no lesion: 0 mL
    clinical.append(("sub-900", "0", "0"))
    masks["sub-900"] = empty
    bad = _ball(300, CENTRES[0], shape, grid)
    rows.append(_write_case(root, "sub-901", bad, grid, {"ok": False, "error": "MNI registration failed: test"}))
    clinical.append(("sub-901", "n/a", "3"))  # NIHSS missing
    masks["sub-901"] = bad
    rows.append(_write_case(root, "sub-902", _ball(50, CENTRES[1], shape, grid), grid, _reg()))
    clinical.append(("sub-902", "severe", "7"))  # non-numeric NIHSS, mRS out of range
    masks["sub-902"] = _ball(50, CENTRES[1], shape, grid)
    rows.append(cohort_row(CaseNames("sub-903", None), "failed", error="DWI and ADC do not overlap"))
    clinical.append(("sub-903", "12", "4"))
    rows.append(_write_case(root, "sub-904", _ball(80, CENTRES[2], shape, grid), grid, _reg()))  # no clinical row
    clinical.append(("sub-905", "5", "1"))  # not in the batch
    (root / "cohort.tsv").write_text(cohort_tsv(rows))
    part = tmp / "participants.tsv"
    part.write_text("participant_id\tNIHSS_admission\tmRS_90d\tsex\n"
                    + "".join(f"{p}\t{a}\t{b}\tF\n" for p, a, b in clinical))  # fmt: skip
    res = run_cohort(root, part, tmp / "out", reference=ref, n_boot=n_boot, seed=0)
    return {"res": res, "tmp": tmp, "root": root, "ref": ref, "part": part, "z": z, "e": e, "k": k,
            "nihss": nihss, "mrs": mrs, "masks": masks, "grid": grid}  # fmt: skip


def _stat(res, score, source, biomarker):
    return next(r for r in res.statistics if (r["score"], r["source"], r["biomarker"]) == (score, source, biomarker))


def test_planted_volume_nihss_relation_is_recovered(cohort):
    res, grid = cohort["res"], cohort["grid"]
    voxel_ml = abs(np.linalg.det(grid[:3, :3])) / 1000
    # the subjects with a usable NIHSS: the N planted ones + sub-900 (0 mL, NIHSS 0) + sub-902's NIHSS is bad,
    # sub-901's missing
    vol = [cohort["masks"][f"sub-{i:03d}"].sum() * voxel_ml for i in range(N)] + [0.0]
    nih = list(cohort["nihss"]) + [0.0]
    expected = stats.spearmanr(vol, nih)
    row = _stat(res, "nihss", "predicted", "volume_ml")
    assert row["n"] == N + 1
    assert row["rho"] == pytest.approx(expected.statistic, abs=1e-12)
    assert row["p"] == pytest.approx(expected.pvalue, rel=1e-9)
    # the population value of the generating model, by Monte Carlo on 200 000 draws (volume = voxel count)
    rng = np.random.default_rng(123)
    z, e = rng.standard_normal(200_000), rng.standard_normal(200_000)
    planted = stats.spearmanr(_volume_voxels(z), _nihss(z, e)).statistic
    assert row["ci_low"] < planted < row["ci_high"]
    assert row["ci_low"] < row["rho"] < row["ci_high"]
    assert 0.4 < planted < 0.8  # a real relation, not a degenerate one


def test_bootstrap_ci_matches_scipy_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(30)
    y = x + rng.standard_normal(30)
    dist = bootstrap_spearman(x, y, 4000, seed=1)
    lo, hi = np.quantile(dist, [0.025, 0.975])
    ref = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True, vectorized=False,
                          n_resamples=4000, method="percentile", random_state=2).confidence_interval  # fmt: skip
    assert lo == pytest.approx(ref.low, abs=0.05)
    assert hi == pytest.approx(ref.high, abs=0.05)


def test_expert_volumes_and_difference(cohort):
    res, masks, grid = cohort["res"], cohort["masks"], cohort["grid"]
    voxel_ml = abs(np.linalg.det(grid[:3, :3])) / 1000
    ids = [f"sub-{i:03d}" for i in range(N)]  # sub-900 has no reference mask: excluded from the expert side
    pred = [masks[p].sum() * voxel_ml for p in ids]
    expert = [masks[p + "_expert"].sum() * voxel_ml for p in ids]
    y = cohort["nihss"]
    row = _stat(res, "nihss", "expert", "volume_ml")
    assert row["n"] == N
    assert row["rho"] == pytest.approx(stats.spearmanr(expert, y).statistic, abs=1e-12)
    d = next(r for r in res.differences if (r["score"], r["biomarker"]) == ("nihss", "volume_ml"))
    assert d["n"] == N
    diff = stats.spearmanr(pred, y).statistic - stats.spearmanr(expert, y).statistic
    assert d["diff"] == pytest.approx(diff, abs=1e-12)
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert 0 <= d["p_boot"] <= 1
    subj = {s.participant_id: s for s in res.subjects}
    assert subj["sub-004"].expert_count == 1 and subj["sub-004"].count == 2


def test_exclusions_are_reported(cohort):
    res = cohort["res"]
    got = {(e["participant_id"], e["excluded_from"]): e["reason"] for e in res.exclusions}
    assert got[("sub-901", "nihss")] == "NIHSS_admission: missing value"
    assert got[("sub-902", "nihss")] == "NIHSS_admission: non-numeric value 'severe'"
    assert got[("sub-902", "mrs")] == "mRS_90d: value 7 outside 0-6"
    assert got[("sub-903", "all")] == "segmentation failed: DWI and ADC do not overlap"
    assert got[("sub-904", "all")] == "not in participants.tsv"
    assert got[("sub-905", "all")] == "not in the batch output"
    why = got[("sub-901", "lobe volumes, frequency map")]
    assert why == "no usable MNI registration: MNI registration failed: test"
    assert got[("sub-900", "expert volume")].startswith("no reference mask")
    # written too
    with open(res.files["exclusions_csv"], newline="") as fh:
        written = {(r["participant_id"], r["excluded_from"]) for r in csv.DictReader(fh)}
    assert written == set(got)
    # sub-901 (failed registration) still counts for volume vs mRS
    assert _stat(res, "mrs", "predicted", "volume_ml")["n"] == N + 2  # planted + sub-900 + sub-901


def test_frequency_map_is_the_voxelwise_mean(cohort):
    res, masks = cohort["res"], cohort["masks"]
    img = nib.load(res.files["frequency_nifti"])
    in_map = [f"sub-{i:03d}" for i in range(N)] + ["sub-900", "sub-902"]  # identity registration: no warping
    expected = np.mean([masks[p] for p in in_map], axis=0)
    assert res.map_n == len(in_map)
    np.testing.assert_allclose(np.asarray(img.dataobj), expected, atol=1e-6)
    np.testing.assert_allclose(img.affine, cohort["grid"])


def test_lobe_volumes_add_up_and_land_in_the_planted_lobe(cohort):
    res = cohort["res"]
    for s in res.subjects:
        if s.lobe_ml is not None:
            assert sum(s.lobe_ml.values()) == pytest.approx(s.volume_ml, abs=1e-9)
    big = max((s for s in res.subjects if s.participant_id.startswith("sub-0")), key=lambda s: s.volume_ml)
    assert big.lobe_ml is not None and max(big.lobe_ml, key=big.lobe_ml.get) != "outside"
    assert any(r["biomarker"] == "subcortical_ml" and r["rho"] is not None for r in res.statistics)


def test_outputs_are_self_contained(cohort):
    res = cohort["res"]
    page = res.files["html"].read_text()
    assert page.count("data:image/png;base64,") == 3  # two scatters + frequency montage
    assert "http://" not in page and "https://" not in page and "<script" not in page
    data = json.loads(res.files["statistics_json"].read_text())
    assert data["score_columns"]["nihss"]["column"] == "NIHSS_admission"
    with open(res.files["statistics_csv"], newline="") as fh:
        assert len(list(csv.DictReader(fh))) == len(res.statistics)


def test_warp_matches_an_independent_resampling():
    shape, grid = map_grid()
    rng = np.random.default_rng(0)
    affine = np.array([[3.0, 0, 0, -80.3], [0, 3.0, 0, -110.6], [0, 0, 4.0, -60.2], [0, 0, 0, 1]])
    mask = np.zeros((50, 70, 30), bool)
    mask[20:35, 30:45, 10:20] = rng.random((15, 15, 10)) > 0.4
    theta = np.deg2rad(8)
    matrix = np.array([[np.cos(theta), -np.sin(theta), 0, 4.3], [np.sin(theta), np.cos(theta), 0, -2.1],
                       [0, 0, 1.05, 3.7], [0, 0, 0, 1]])  # fmt: skip
    got = warp_to_mni(mask, affine, matrix)
    # independently: every MNI voxel centre -> case mm -> nearest case voxel
    ijk = np.indices(shape).reshape(3, -1).T
    mni = ijk @ grid[:3, :3].T + grid[:3, 3]
    inv = np.linalg.inv(matrix)
    case_mm = mni @ inv[:3, :3].T + inv[:3, 3]
    vox = case_mm @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    near = np.floor(vox + 0.5).astype(int)
    inside = np.all((near >= 0) & (near < mask.shape), axis=1)
    expected = np.zeros(len(ijk), bool)
    expected[inside] = mask[tuple(near[inside].T)]
    assert got.sum() > 100
    assert np.array_equal(got, expected.reshape(shape))


runner = CliRunner()


def test_cli_errors_name_the_problem(cohort):
    tmp = cohort["tmp"]
    r = runner.invoke(app, ["cohort", str(cohort["root"]), "--participants", str(cohort["part"]), "--nihss", "NIHSS",
                            "-o", str(tmp / "o1")])  # fmt: skip
    assert r.exit_code == 2
    assert "--nihss NIHSS: no such column" in r.output and "NIHSS_admission, mRS_90d, sex" in r.output
    other = tmp / "other.tsv"
    other.write_text("participant_id\tnihss\nsub-x1\t3\nsub-x2\t4\n")
    r = runner.invoke(app, ["cohort", str(cohort["root"]), "--participants", str(other), "-o", str(tmp / "o2")])
    assert r.exit_code == 2 and "no subject of" in r.output and "sub-x1" in r.output
    r = runner.invoke(app, ["cohort", str(tmp), "--participants", str(other), "-o", str(tmp / "o3")])
    assert r.exit_code == 2 and "no cohort.tsv" in r.output
    none = tmp / "none.tsv"
    none.write_text("participant_id\tage\nsub-000\t70\n")
    r = runner.invoke(app, ["cohort", str(cohort["root"]), "--participants", str(none), "-o", str(tmp / "o4")])
    assert r.exit_code == 2 and "no NIHSS or mRS column" in r.output and "age" in r.output


def test_cli_runs_and_prints_exclusions(cohort):
    tmp = cohort["tmp"]
    r = runner.invoke(app, ["cohort", str(cohort["root"]), "--participants", str(cohort["part"]), "--bootstrap",
                            "200", "-o", str(tmp / "cli")])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "not in participants.tsv" in r.output and "segmentation failed" in r.output
    assert (tmp / "cli" / "cohort_report.html").is_file()
    r = runner.invoke(app, ["cohort", str(cohort["root"]), "--participants", str(cohort["part"]), "-o",
                            str(tmp / "cli")])  # fmt: skip
    assert r.exit_code == 2 and "--overwrite" in r.output
