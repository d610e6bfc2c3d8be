"""deepisles.metrics against outputs of the official ISLES'22 evaluation code (tests/fixtures/metrics).

How the fixtures were made: scripts/make_metrics_fixtures.md. Tolerances: 1e-6 for Dice and lesion F1,
1e-3 mL for the volume difference, exact lesion count difference.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from deepisles import metrics as M
from deepisles.errors import InputError
from deepisles.io.image import Image

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
OFFICIAL = json.loads((FIXTURES / "official_results.json").read_text())
CASES = OFFICIAL["cases"]
SYNTHETIC = sorted(k for k, v in CASES.items() if v["kind"] == "synthetic")
REAL = sorted(k for k, v in CASES.items() if v["kind"] == "real")
VARIANTS = ("official_isles22_eval_utils", "official_grand_challenge")


@pytest.fixture(scope="module")
def arrays():
    with np.load(FIXTURES / "cases.npz") as z:
        return {k: z[k] for k in z.files}


def assert_matches(ours: dict, expected: dict, label: str = "") -> None:
    assert set(ours) == set(M.COLUMNS[1:])
    assert ours["dice"] == pytest.approx(expected["dice"], abs=1e-6), label
    assert ours["lesion_f1"] == pytest.approx(expected["lesion_f1"], abs=1e-6), label
    assert ours["abs_volume_diff_ml"] == pytest.approx(expected["abs_volume_diff_ml"], abs=1e-3), label
    assert ours["abs_lesion_count_diff"] == expected["abs_lesion_count_diff"], label
    assert isinstance(ours["abs_lesion_count_diff"], int)


def _variants(name: str) -> list[str]:
    # NaN voxels: only the eval_utils variant sees them (SimpleITK reads NaN as 0), see the fixture's note
    return ["official_isles22_eval_utils"] if name == "float_nan_tiny" else list(VARIANTS)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, header=None) -> Path:
    nib.save(nib.Nifti1Image(data, affine, header), str(path))
    return path


# ------------------------------------------------------------------------------------ official fixtures
def test_fixture_set_covers_the_edge_cases():
    wanted = {"both_empty", "pred_empty", "gt_empty", "float_masks", "anisotropic", "oblique",
              "diagonal_contacts", "many_components"}  # fmt: skip
    assert wanted <= set(SYNTHETIC)
    assert (FIXTURES / "cases.npz").stat().st_size + (
        FIXTURES / "official_results.json"
    ).stat().st_size < 1_000_000
    # the two official variants agree wherever both apply
    for name in SYNTHETIC + REAL:
        if name != "float_nan_tiny":
            a, b = (CASES[name][v] for v in VARIANTS)
            assert_matches({k: a[k] for k in M.METRICS}, b, name)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_case_metrics_matches_official(name, arrays):
    gt, pred = arrays[f"{name}__gt"], arrays[f"{name}__pred"]
    for variant in _variants(name):
        expected = CASES[name][variant]
        assert_matches(M.case_metrics(pred, gt, expected["voxel_volume_ml"]), expected, f"{name} {variant}")


@pytest.mark.parametrize("name", SYNTHETIC)
def test_evaluate_pair_matches_official_on_files(name, arrays, tmp_path):
    affine = arrays[f"{name}__affine"]
    gt = write_nifti(tmp_path / "gt.nii.gz", arrays[f"{name}__gt"], affine)
    pred = write_nifti(tmp_path / "pred.nii.gz", arrays[f"{name}__pred"], affine)
    ours = M.evaluate_pair(pred, gt)
    for variant in _variants(name):
        assert_matches(ours, CASES[name][variant], f"{name} {variant}")


def test_voxel_volume_comes_from_the_header_zooms(arrays, tmp_path):
    # anisotropic 0.5 x 0.9 x 5 mm, and an oblique grid: v = prod(zooms) / 1000 (= |det A| / 1000 there)
    for name, v in (("anisotropic", 0.5 * 0.9 * 5.0 / 1000), ("oblique", 1.2 * 0.8 * 3.0 / 1000)):
        assert CASES[name]["official_isles22_eval_utils"]["voxel_volume_ml"] == pytest.approx(v, rel=1e-6)
        gt, pred = arrays[f"{name}__gt"], arrays[f"{name}__pred"]
        diff = abs(int(np.count_nonzero(gt)) - int(np.count_nonzero(pred))) * v
        assert M.case_metrics(pred, gt, v)["abs_volume_diff_ml"] == pytest.approx(diff, rel=1e-9)


def test_mha_prediction_against_nifti_ground_truth(arrays, tmp_path):
    name = "oblique"
    affine = arrays[f"{name}__affine"]
    gt = write_nifti(tmp_path / "gt.nii.gz", arrays[f"{name}__gt"], affine)
    pred = tmp_path / "pred.mha"
    sitk.WriteImage(Image(arrays[f"{name}__pred"], affine).to_sitk(), str(pred))
    assert_matches(M.evaluate_pair(pred, gt), CASES[name]["official_grand_challenge"], name)


# ------------------------------------------------------------------------------------ real ISLES'22 masks
def _real_gt(rel: str, isles22_case, isles22_masks_only) -> Path:
    known = {p.name: p for p in [isles22_case["msk"], isles22_case["reference"], *isles22_masks_only]}
    path = known.get(Path(rel).name)
    if path is None:
        pytest.skip(f"{rel} not in the shared data")
    return path


def _derive(gt_img: nib.Nifti1Image, op: list) -> np.ndarray:
    data = np.asanyarray(gt_img.dataobj)
    if op[0] == "shift":
        axis, n = op[1], op[2]
        out = np.zeros_like(data)
        src, dst = [slice(None)] * 3, [slice(None)] * 3
        src[axis], dst[axis] = slice(0, data.shape[axis] - n), slice(n, None)
        out[tuple(dst)] = data[tuple(src)]
        return out
    assert op[0] == "flip"
    return np.ascontiguousarray(np.flip(data, op[1]))


@pytest.mark.parametrize("name", REAL)
def test_real_masks_match_official(name, isles22_case, isles22_masks_only, tmp_path):
    spec = CASES[name]
    gt_path = _real_gt(spec["gt"], isles22_case, isles22_masks_only)
    if hashlib.sha256(gt_path.read_bytes()).hexdigest() != spec["gt_sha256"]:
        pytest.skip(f"{gt_path} is not the file the fixtures were made from")
    gt_img = nib.load(str(gt_path))
    if spec["op"][0] == "file":
        pred_path = _real_gt(spec["op"][1], isles22_case, isles22_masks_only)
    else:
        pred_path = write_nifti(
            tmp_path / "pred.nii.gz", _derive(gt_img, spec["op"]), gt_img.affine, gt_img.header
        )
    for variant in VARIANTS:
        expected = spec[variant]
        pred = np.asanyarray(nib.load(str(pred_path)).dataobj)
        ours = M.case_metrics(pred, np.asanyarray(gt_img.dataobj), expected["voxel_volume_ml"])
        assert_matches(ours, expected, f"{name} {variant}")
    if name == "real_case0002_vs_case0003":  # different grids: refused when read from files
        with pytest.raises(InputError, match="not on the grid"):
            M.evaluate_pair(pred_path, gt_path)
    else:
        assert_matches(M.evaluate_pair(pred_path, gt_path), spec["official_isles22_eval_utils"], name)


def test_real_case_reference_numbers(isles22_case):
    row = M.evaluate_pair(isles22_case["reference"], isles22_case["msk"])
    assert row["dice"] == pytest.approx(0.788, abs=1e-3)
    assert row["lesion_f1"] == pytest.approx(0.921, abs=1e-3)


# ------------------------------------------------------------------------------------ definitions
def test_edge_cases_of_the_definitions():
    z = np.zeros((5, 5, 5), np.uint8)
    one = z.copy()
    one[2, 2, 2] = 1
    assert M.case_metrics(z, z, 1.0) == {"dice": 1.0, "abs_volume_diff_ml": 0.0, "abs_lesion_count_diff": 0,
                                         "lesion_f1": 1.0}  # fmt: skip
    for pred, gt in ((one, z), (z, one)):
        r = M.case_metrics(pred, gt, 0.008)
        assert (r["dice"], r["lesion_f1"], r["abs_lesion_count_diff"]) == (0.0, 0.0, 1)
        assert r["abs_volume_diff_ml"] == pytest.approx(0.008)
    # bool, float and 4D (trailing singleton) inputs are binarised as nonzero
    assert M.case_metrics(one.astype(bool), (one * -0.3).astype(np.float32)[..., None], 1.0)["dice"] == 1.0
    # corner contact merges under 26-connectivity; touching without overlap is not a detection
    gt = z.copy()
    gt[0, 0, 0] = gt[1, 1, 1] = 1
    pred = z.copy()
    pred[2, 2, 2] = 1
    r = M.case_metrics(pred, gt, 1.0)
    assert (r["abs_lesion_count_diff"], r["lesion_f1"], r["dice"]) == (0, 0.0, 0.0)
    with pytest.raises(ValueError):
        M.case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 1.0)


# ------------------------------------------------------------------------------------ reading, grids
def test_grid_mismatch_names_both_files(tmp_path):
    a = np.zeros((6, 6, 6), np.uint8)
    gt = write_nifti(tmp_path / "gt.nii.gz", a, np.diag([1.0, 1.0, 1.0, 1.0]))
    other_shape = write_nifti(tmp_path / "shape.nii.gz", np.zeros((6, 6, 7), np.uint8), np.eye(4))
    other_spacing = write_nifti(tmp_path / "spacing.nii.gz", a, np.diag([1.0, 1.0, 2.0, 1.0]))
    shifted = np.eye(4)
    shifted[:3, 3] = [0.5, 0, 0]
    other_origin = write_nifti(tmp_path / "origin.nii.gz", a, shifted)
    for pred, needle in ((other_shape, "6x6x7"), (other_spacing, "1x1x2"), (other_origin, "origin")):
        with pytest.raises(InputError) as err:
            M.evaluate_pair(pred, gt)
        msg = str(err.value)
        assert str(pred) in msg and str(gt) in msg and needle in msg and "\n" not in msg
    # within 1e-3 mm is the same grid
    close = np.eye(4)
    close[0, 3] = 5e-4
    M.evaluate_pair(write_nifti(tmp_path / "close.nii.gz", a, close), gt)


def test_unreadable_or_missing_file_is_an_input_error(tmp_path):
    gt = write_nifti(tmp_path / "gt.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read"):
        M.evaluate_pair(bad, gt)
    with pytest.raises(InputError, match="does not exist"):
        M.evaluate_pair(tmp_path / "nope.nii.gz", gt)
    flat = write_nifti(tmp_path / "flat.nii.gz", np.zeros((4, 4, 4, 2), np.uint8), np.eye(4))
    with pytest.raises(InputError, match="3D"):
        M.evaluate_pair(flat, gt)


# ------------------------------------------------------------------------------------ pairing
def _mask(path: Path, value: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((4, 4, 4), np.uint8)
    a[1, 1, 1] = value
    return write_nifti(path, a, np.eye(4))


def test_pair_two_files(tmp_path):
    gt, pred = _mask(tmp_path / "g" / "case7.nii.gz"), _mask(tmp_path / "p" / "whatever.mha.nii")
    assert M.pair_cases(pred, gt) == [("case7", pred, gt)]


def test_pair_identical_names(tmp_path):
    for n in ("b.nii.gz", "a.nii", "c.nii.gz"):
        _mask(tmp_path / "gt" / n)
        _mask(tmp_path / "pred" / n)
    (tmp_path / "gt" / "notes.txt").write_text("ignored")
    (tmp_path / "pred" / "metrics.csv").write_text("ignored")
    pairs = M.pair_cases(tmp_path / "pred", tmp_path / "gt")
    assert [c for c, _, _ in pairs] == ["a", "b", "c"]
    assert all(p.name == g.name and p.parent.name == "pred" for _, p, g in pairs)


def test_pair_identical_names_missing_and_unpaired(tmp_path):
    for n in ("a.nii.gz", "b.nii.gz"):
        _mask(tmp_path / "gt" / n)
    _mask(tmp_path / "pred" / "a.nii.gz")
    with pytest.raises(InputError, match=r"no prediction for 1 of 2 .*b\.nii\.gz"):
        M.pair_cases(tmp_path / "pred", tmp_path / "gt")
    _mask(tmp_path / "pred" / "b.nii.gz")
    _mask(tmp_path / "pred" / "zzz.nii.gz")
    with pytest.raises(InputError, match=r"without a ground-truth file: zzz\.nii\.gz"):
        M.pair_cases(tmp_path / "pred", tmp_path / "gt")


def _isles_gt(root: Path, subjects) -> Path:
    for s in subjects:
        _mask(root / "derivatives" / f"sub-{s}" / "ses-0001" / f"sub-{s}_ses-0001_msk.nii.gz")
        raw = root / "rawdata" / f"sub-{s}" / "ses-0001"
        _mask(raw / f"sub-{s}_ses-0001_dwi.nii.gz")
    return root


def test_pair_isles_layout_by_subject(tmp_path):
    gt = _isles_gt(
        tmp_path / "isles", ["strokecase0001", "strokecase0002", "strokecase0003", "strokecase00010"]
    )
    pred = tmp_path / "pred"
    a = _mask(pred / "sub-strokecase0001_ses-0001_msk.nii.gz")
    b = _mask(pred / "sub-strokecase0002.nii.gz")
    c = _mask(pred / "sub-strokecase0003" / "lesion_mask.nii.gz")  # a `deepisles segment` output folder:
    _mask(pred / "sub-strokecase0003" / "lesion_prob.nii.gz")  # its probability and agreement maps are skipped
    _mask(pred / "sub-strokecase0003" / "lesion_agreement.nii.gz")
    d = _mask(pred / "sub-strokecase00010.mha.nii.gz")
    expected = [
        ("sub-strokecase0001", a, gt / "derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz"),
        ("sub-strokecase00010", d, gt / "derivatives/sub-strokecase00010/ses-0001/sub-strokecase00010_ses-0001_msk.nii.gz"),
        ("sub-strokecase0002", b, gt / "derivatives/sub-strokecase0002/ses-0001/sub-strokecase0002_ses-0001_msk.nii.gz"),
        ("sub-strokecase0003", c, gt / "derivatives/sub-strokecase0003/ses-0001/sub-strokecase0003_ses-0001_msk.nii.gz"),
    ]  # fmt: skip
    assert M.pair_cases(pred, gt) == expected
    # the derivatives folder itself works as well
    assert M.pair_cases(pred, gt / "derivatives") == expected


def test_pair_isles_layout_missing_unpaired_ambiguous(tmp_path):
    gt = _isles_gt(tmp_path / "isles", ["strokecase0001", "strokecase0002"])
    pred = tmp_path / "pred"
    _mask(pred / "sub-strokecase0001.nii.gz")
    with pytest.raises(
        InputError, match=r"no prediction for 1 of 2 ground-truth case\(s\): sub-strokecase0002"
    ):
        M.pair_cases(pred, gt)
    _mask(pred / "sub-strokecase0002.nii.gz")
    _mask(pred / "sub-strokecase0099.nii.gz")
    with pytest.raises(InputError, match=r"without a ground-truth case: sub-strokecase0099"):
        M.pair_cases(pred, gt)
    (pred / "sub-strokecase0099.nii.gz").unlink()
    _mask(pred / "sub-strokecase0002_run-2.nii.gz")
    with pytest.raises(InputError, match="several predictions for sub-strokecase0002"):
        M.pair_cases(pred, gt)



def test_isles_ground_truth_uses_the_dataset_finder(tmp_path):
    """The ground-truth cases of an ISLES'22 dataset are the masks deepisles.io.dataset finds for train/batch:
    a nested pipeline folder works, a subject with several sessions is keyed by session, two masks of one
    session are refused, and a flat folder of masks is still paired by file name."""
    from deepisles.io.dataset import find_cases

    root = tmp_path / "ds"
    der = root / "derivatives" / "lesion_masks"
    for sub, ses in (("sub-a", "ses-1"), ("sub-b", "ses-1"), ("sub-b", "ses-2")):
        _mask(der / sub / ses / f"{sub}_{ses}_msk.nii.gz")
        for role in ("dwi", "adc"):
            _mask(root / "rawdata" / sub / ses / f"{sub}_{ses}_{role}.nii.gz")
    pred = tmp_path / "pred"
    pa, pb1, pb2 = (_mask(pred / n) for n in ("sub-a.nii.gz", "sub-b_ses-1.nii.gz", "sub-b_ses-2.nii.gz"))
    pairs = M.pair_cases(pred, root)
    assert pairs == [("sub-a", pa, der / "sub-a/ses-1/sub-a_ses-1_msk.nii.gz"),
                     ("sub-b_ses-1", pb1, der / "sub-b/ses-1/sub-b_ses-1_msk.nii.gz"),
                     ("sub-b_ses-2", pb2, der / "sub-b/ses-2/sub-b_ses-2_msk.nii.gz")]
    assert sorted(g for _, _, g in pairs) == sorted(c.mask for c in find_cases(root))
    (pred / "sub-b_ses-2.nii.gz").rename(pred / "sub-b.nii.gz")
    with pytest.raises(InputError, match=r"no prediction for 1 of 3 ground-truth case\(s\): sub-b_ses-2 "):
        M.pair_cases(pred, root)
    (pred / "sub-b.nii.gz").rename(pred / "sub-b_ses-2.nii.gz")
    _mask(root / "derivatives" / "other" / "sub-a" / "ses-1" / "sub-a_ses-1_msk.nii.gz")
    with pytest.raises(InputError, match="several masks for sub-a_ses-1"):
        M.pair_cases(pred, root)
    flat = tmp_path / "flat"
    g = _mask(flat / "sub-a_ses-1_msk.nii.gz")
    assert M.pair_cases(pred / "sub-a.nii.gz", g) == [("sub-a_ses-1_msk", pred / "sub-a.nii.gz", g)]
    (tmp_path / "flatpred").mkdir()
    q = _mask(tmp_path / "flatpred" / "sub-a_ses-1_msk.nii.gz")
    assert M.pair_cases(tmp_path / "flatpred", flat) == [("sub-a_ses-1_msk", q, g)]  # by name, as before

def test_pair_refuses_file_with_folder_and_empty_folders(tmp_path):
    f = _mask(tmp_path / "a.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="two files or two folders"):
        M.pair_cases(f, tmp_path / "empty")
    with pytest.raises(InputError, match="no ground-truth masks"):
        M.pair_cases(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        M.pair_cases(tmp_path / "missing", f)


# ------------------------------------------------------------------------------------ batch, CSV, summary
def test_evaluate_paths_sorted_with_progress(tmp_path):
    for n, v in (("b.nii.gz", 1), ("a.nii.gz", 1)):
        _mask(tmp_path / "gt" / n)
        _mask(tmp_path / "pred" / n, v)
    from deepisles.progress import Recorder

    rec = Recorder()
    rows = M.evaluate_paths(
        tmp_path / "pred", tmp_path / "gt", progress=rec
    )
    assert [r["case"] for r in rows] == ["a", "b"]
    assert list(rows[0]) == list(M.COLUMNS)
    assert rows[0]["dice"] == 1.0 and rec.advances == [(1, 2, "a"), (2, 2, "b")]


def test_csv_has_exactly_the_columns(tmp_path):
    rows = [
        {
            "case": "b",
            "dice": 0.5,
            "abs_volume_diff_ml": 1.25,
            "abs_lesion_count_diff": 2,
            "lesion_f1": 2 / 3,
        },
        {
            "case": "a",
            "dice": 1.0,
            "abs_volume_diff_ml": 0.0,
            "abs_lesion_count_diff": 0,
            "lesion_f1": 1.0,
            "x": 9,
        },
    ]
    out = M.write_metrics_csv(tmp_path / "sub" / "metrics.csv", rows)
    text = out.read_text()
    assert text.splitlines()[0] == ",".join(M.COLUMNS)
    back = list(csv.DictReader(text.splitlines()))
    assert [list(r) for r in back] == [list(M.COLUMNS)] * 2
    assert (
        back[0]["case"] == "b"
        and float(back[0]["lesion_f1"]) == 2 / 3
        and back[0]["abs_lesion_count_diff"] == "2"
    )
    assert not [p for p in out.parent.iterdir() if p.name != "metrics.csv"]  # no temp file left


def test_summary_values():
    rows = [{"case": str(i), "dice": d, "abs_volume_diff_ml": v, "abs_lesion_count_diff": c, "lesion_f1": f}
            for i, (d, v, c, f) in enumerate([(0.0, 1.0, 0, 1.0), (0.5, 2.0, 1, 0.5), (1.0, 4.0, 2, 0.0),
                                              (0.9, 8.0, 5, 0.25)])]  # fmt: skip
    s = M.summarize(rows)
    assert set(s) == set(M.METRICS)
    assert s["dice"] == pytest.approx({"mean": 0.6, "median": 0.7, "q1": 0.375, "q3": 0.925, "n": 4})
    assert s["abs_volume_diff_ml"] == pytest.approx(
        {"mean": 3.75, "median": 3.0, "q1": 1.75, "q3": 5.0, "n": 4}
    )
    assert s["abs_lesion_count_diff"]["median"] == 1.5 and s["abs_lesion_count_diff"]["n"] == 4
    assert s["lesion_f1"]["q1"] == pytest.approx(0.1875)
    assert M.summarize([])["dice"]["n"] == 0
