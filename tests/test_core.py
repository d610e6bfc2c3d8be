"""Image grid conversions, atomic writing and the overwrite guard."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from deepisles.errors import OutputExistsError
from deepisles.io.image import Image
from deepisles.io.write import check_output_dir, write_json_atomic, write_nifti_atomic, write_with_atomic


def _oblique_affine() -> np.ndarray:
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.9, 1.2, 4.0])
    aff[:3, 3] = [90.0, -120.0, -40.0]
    return aff


def test_sitk_round_trip_keeps_grid_and_world_positions():
    rng = np.random.default_rng(0)
    img = Image(rng.random((7, 9, 5)).astype(np.float32), _oblique_affine())
    s = img.to_sitk()
    back = Image.from_sitk(s)
    assert back.same_grid(img, atol=1e-6)
    np.testing.assert_array_equal(back.data, img.data)
    # the same voxel maps to the same physical point (ITK works in LPS)
    ijk = (3, 4, 2)
    lps = np.array(s.TransformIndexToPhysicalPoint(ijk))
    ras = img.affine @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(lps * [-1, -1, 1], ras[:3], atol=1e-6)
    assert s.GetPixel(*ijk) == pytest.approx(float(img.data[ijk]))


def test_nifti_round_trip_and_voxel_volume(tmp_path):
    img = Image(np.ones((4, 4, 4), np.float32), _oblique_affine())
    path = write_nifti_atomic(tmp_path / "x.nii.gz", img.to_nifti())
    back = nib.load(path)
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    assert img.voxel_volume_ml == pytest.approx(0.9 * 1.2 * 4.0 / 1000)
    assert img.spacing == pytest.approx((0.9, 1.2, 4.0))
    assert sitk.ReadImage(str(path)).GetSize() == (4, 4, 4)


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out" / "preview.png"

    def crash(tmp):
        tmp.write_bytes(b"half a file")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_with_atomic(target, crash)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    p = write_json_atomic(tmp_path / "r.json", {"a": np.int64(3), "b": np.float32(0.5)})
    assert p.read_text().strip().startswith("{")
    write_json_atomic(p, {"a": 4})
    assert '"a": 4' in p.read_text()
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_output_guard_refuses_existing_results(tmp_path):
    names = ("lesion_mask.nii.gz", "report.json")
    check_output_dir(tmp_path / "new", names, overwrite=False)  # absent folder: fine
    check_output_dir(tmp_path, names, overwrite=False)  # empty folder: fine
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output_dir(tmp_path, names, overwrite=False)
    check_output_dir(tmp_path, names, overwrite=True)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output_dir(afile, names, overwrite=True)


# --- deepisles.core: the Case and the device choice ------------------------------------------------------
def test_case_gives_its_modalities_by_name():
    from deepisles.core import Case

    dwi = Image(np.ones((3, 3, 3), np.float32), np.eye(4))
    adc = Image(np.full((3, 3, 3), 0.8, np.float32), np.eye(4))
    case = Case(dwi=dwi, adc=adc, brain=np.ones((3, 3, 3), bool))
    assert case.modality("dwi") is dwi and case.modality("adc") is adc and case.modality("flair") is None
    with pytest.raises(KeyError):
        case.modality("t2")


def test_resolve_device(monkeypatch):
    import torch

    from deepisles.core import resolve_device
    from deepisles.errors import DeepIslesError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device(" CPU ") == "cpu" and resolve_device("") == "cpu"
    with pytest.raises(DeepIslesError, match="no CUDA GPU is available"):
        resolve_device("cuda:1")
    with pytest.raises(DeepIslesError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


def test_moved_names_are_still_importable_from_their_old_homes():
    from deepisles import api, core
    from deepisles.members import Case as members_case
    from deepisles.members import base

    assert api.resolve_device is core.resolve_device and base.Case is core.Case is members_case
