"""report.html: self-contained (bundle, numbers, volumes inlined; nothing fetched), atomic, never overwritten
unasked; in headless Chromium the NiiVue viewer shows the lesion in red (skipped without a Chromium, except under
.ci/run, which installs one and sets DEEPISLES_REQUIRE_BROWSER=1 so that a missing browser fails)."""

from __future__ import annotations

import base64
import gzip
import importlib.util
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from deepisles.errors import OutputExistsError
from deepisles.io.image import Image
from deepisles.outputs.html_report import (
    HTML_NAME,
    NIIVUE_VERSION,
    focus_mm,
    niivue_bundle,
    render_html,
    write_html_report,
)

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0]) @ np.array([[1, 0, 0, -20], [0, 1, 0, -20], [0, 0, 1, -8], [0, 0, 0, 1.0]])
NOTE = "default model trained on synthetic data, not clinically validated"


def _load_script():
    spec = importlib.util.spec_from_file_location("screenshot_report", REPO / "scripts" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _images(lesion: bool = True) -> dict[str, Image]:
    rng = np.random.default_rng(0)
    shape = (20, 20, 8)
    dwi = rng.uniform(100, 400, shape).astype(np.float32)
    adc = rng.uniform(0.6, 3.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    if lesion:
        mask[5:9, 6:10, 3:5] = 1
    return {k: Image(v, AFFINE) for k, v in {"dwi": dwi, "adc": adc, "flair": dwi * 0.5, "mask": mask}.items()}


def _report() -> dict:
    return {
        "tool": {"name": "deepisles", "version": "9.9.9"},
        "created": "2026-01-01T00:00:00+00:00",
        "inputs": {"dwi": {"path": "/data/sub-07_dwi.nii.gz", "sha256": "ab" * 32}},
        "members": {
            "run": [{"name": "seals", "description": "nnU-Net", "lesion_volume_ml": 1.5,
                     "weights": {"kind": "default", "note": NOTE}}],
            "skipped": [{"member": "nvauto", "reason": "weights not imported"}],
        },
        "ensemble": {"rule": "majority vote"},
        "lesions": {
            "volume_ml": 12.3456, "count": 2, "voxels": 1543, "connectivity": 26,
            "hemisphere": "left", "lobes": ["frontal", "parietal"],
            "table": [
                {"id": 1, "voxels": 1500, "volume_ml": 12.0, "centroid_mm": [-30.5, 10.25, 40.0],
                 "mean_adc_1e-3_mm2_s": 0.512, "min_adc_1e-3_mm2_s": 0.301, "max_extent_mm": 41.7,
                 "regions": [{"name": "precentral gyrus", "fraction": 0.6}], "lobes": ["frontal"]},
                {"id": 2, "voxels": 43, "volume_ml": 0.3456, "centroid_mm": [-12.0, -5.0, 20.0]},
            ],
        },
        "mismatch": {"dwi_flair_ratio": 0.21, "verdict": "mismatch present"},
        "warnings": ["member nvauto not run: weights not imported <check>"],
    }  # fmt: skip


def _embedded(text: str, vid: str) -> nib.Nifti1Image:
    m = re.search(rf'<script type="application/gzip;base64" id="{vid}">([A-Za-z0-9+/=]+)</script>', text)
    assert m, vid
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(m.group(1))))


def test_html_is_self_contained_with_numbers_and_volumes(tmp_path):
    imgs = _images()
    png = tmp_path / "preview.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    text = render_html(_report(), **imgs, preview_png=png)

    bundle = niivue_bundle()
    assert bundle in text and "</script" not in bundle.lower()
    assert f"NiiVue {NIIVUE_VERSION}" in text and "BSD 2-Clause License" in text
    assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in text
    for s in ("12.35 mL", "sub-07_dwi.nii.gz", "left", "frontal; parietal", "precentral gyrus", "41.7", "0.301",
              "0.512", "(-30.5, 10.25, 40)", "mismatch present", "dwi_flair_ratio", NOTE, "weights not imported",
              "majority vote", "&lt;check&gt;"):  # fmt: skip
        assert s in text, s
    assert "<check>" not in text  # report strings are escaped

    for vid, key in (("vol-dwi", "dwi"), ("vol-adc", "adc"), ("vol-flair", "flair")):
        nii = _embedded(text, vid)
        assert nii.get_data_dtype() == np.int16
        np.testing.assert_allclose(nii.affine, AFFINE)
        ref = imgs[key].data
        np.testing.assert_allclose(nii.get_fdata(), ref, atol=float(np.abs(ref).max()) / 32767)
    mask = _embedded(text, "vol-mask")
    assert mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(mask.dataobj), imgs["mask"].data)

    # nothing is fetched: no src/href/url()/@import to another place, only data: and in-page anchors
    markup = text.replace(bundle, "")
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", markup, flags=re.I)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), refs
    assert not re.search(r"""url\(|@import|<(?:link|iframe|object|embed|base)\b""", markup, flags=re.I)
    assert not re.search(r"""\b(?:src|href)\s*=\s*["'`]?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//""", text, re.I)


def test_odd_or_missing_report_keys_and_no_lesion(tmp_path):
    imgs = _images(lesion=False)
    text = render_html({"lesions": {"table": "bad"}, "members": {"run": ["x", {"weights": "w"}]}}, **imgs)
    assert "No lesion found." in text and "vol-flair" in text
    text = render_html({}, dwi=imgs["dwi"], adc=imgs["adc"], mask=imgs["mask"])
    assert "vol-flair" not in text and "vol-mask" in text


def test_written_atomically_and_not_over_an_existing_file(tmp_path, monkeypatch):
    imgs = _images()
    path = write_html_report(tmp_path, _report(), **imgs)
    assert path == tmp_path / HTML_NAME and path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        write_html_report(tmp_path, {}, **imgs)
    assert path.read_bytes() == before

    def boom(fd):  # interrupted before the rename: the old file stays whole, no temp file is left
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_html_report(tmp_path, {}, **imgs, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [HTML_NAME]
    write_html_report(tmp_path, {}, **imgs, overwrite=True)
    assert path.read_bytes() != before


def test_focus_is_where_the_lesion_is():
    mask = _images()["mask"]
    ijk = np.linalg.solve(AFFINE, [*focus_mm(mask), 1.0])[:3]
    assert mask.data[tuple(int(round(v)) for v in ijk)] == 1


# ---- in a browser ------------------------------------------------------------------------------------------
REQUIRE_BROWSER = "DEEPISLES_REQUIRE_BROWSER"  # set by .ci/run: there, no Chromium is a failure, not a skip


@pytest.fixture(scope="module")
def shot():
    """scripts/screenshot_report.py; without a Chromium a skip, or a failure when $DEEPISLES_REQUIRE_BROWSER=1."""
    mod = _load_script()
    if mod.find_chromium() is None:
        why = f"no Chromium binary found (apt-get install {mod.APT_PACKAGE}, or set $CHROMIUM)"
        if os.environ.get(REQUIRE_BROWSER) == "1":
            pytest.fail(f"{why}; ${REQUIRE_BROWSER}=1 requires the browser test to run")
        pytest.skip(why)
    return mod


@pytest.fixture(scope="module")
def synthetic_report(shot, tmp_path_factory) -> Path:
    """report.html of a synthetic case segmented by the classical member."""
    from deepisles.api import segment
    from deepisles.synth import generate_case

    case = generate_case(3, lesion=True, with_flair=False)
    d = tmp_path_factory.mktemp("html_case")
    nib.save(case.dwi.to_nifti(), d / "dwi.nii.gz")
    nib.save(case.adc.to_nifti(), d / "adc.nii.gz")
    res = segment(d / "dwi.nii.gz", d / "adc.nii.gz", outdir=d / "out", members="classical", device="cpu")
    assert res.count > 0
    return d / "out" / "report.html"  # written by segment itself (write_outputs -> write_html_report)


def test_viewer_shows_the_lesion_in_headless_chromium(shot, synthetic_report, tmp_path):
    dom = shot.dump_dom(synthetic_report)
    head = dom[: dom.index("<head")]
    assert 'data-viewer="ready"' in head, head
    assert 'data-viewer-volumes="2"' in head
    x, y, w, h = (int(v) for v in re.search(r'data-canvas-rect="([\d,]+)"', head).group(1).split(","))
    assert w > 300 and h > 300

    from PIL import Image as PILImage

    png = shot.screenshot(synthetic_report, tmp_path / "shot.png", height=y + h + 20)
    rgb = np.asarray(PILImage.open(png).convert("RGB"), dtype=np.int16)[y : y + h, x : x + w]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r > 140) & (r - np.maximum(g, b) > 80)
    grey = (np.abs(r - g) < 8) & (np.abs(g - b) < 8) & (r > 60)
    assert red.sum() > 30, f"no red lesion overlay in the viewer ({red.sum()} red pixels)"
    assert grey.sum() > 5000, "no DWI shown in the viewer"
