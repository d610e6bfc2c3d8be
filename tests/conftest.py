"""Shared fixtures: the real ISLES'22 case (skipped cleanly when absent) and temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def isles22_dir() -> Path:
    env = os.environ.get("DEEPISLES_ISLES22_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "isles22"


@pytest.fixture(scope="session")
def isles22_case() -> dict[str, Path]:
    """Paths of the real ISLES'22 case sub-strokecase0001 (dwi, adc, msk, reference)."""
    root = isles22_dir() / "sub-strokecase0001"
    files = {
        "dwi": root / "sub-strokecase0001_ses-0001_dwi.nii.gz",
        "adc": root / "sub-strokecase0001_ses-0001_adc.nii.gz",
        "msk": root / "sub-strokecase0001_ses-0001_msk.nii.gz",
        "reference": root / "reference-deepisles-dwi-adc-only_lesion_msk.nii.gz",
    }
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        pytest.skip(f"real ISLES'22 sample data not found ({missing[0]}); set DEEPISLES_ISLES22_DIR")
    return files


@pytest.fixture(scope="session")
def isles22_masks_only() -> list[Path]:
    root = isles22_dir() / "masks-only"
    files = sorted(root.glob("*_msk.nii.gz")) if root.exists() else []
    if not files:
        pytest.skip(f"real ISLES'22 masks not found under {root}")
    return files


@pytest.fixture(autouse=True)
def _isolated_weight_store(tmp_path_factory, monkeypatch):
    """Tests never see the user's ~/.deepisles: an empty store unless a test imports weights into it."""
    from deepisles.members import clear_cache

    if "DEEPISLES_HOME" not in os.environ or not os.environ["DEEPISLES_HOME"].startswith(str(tmp_path_factory.getbasetemp())):
        monkeypatch.setenv("DEEPISLES_HOME", str(tmp_path_factory.mktemp("deepisles_home")))
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(autouse=True)
def _packaged_default_models_off(request, monkeypatch, tmp_path_factory):
    """Tests see no packaged default models unless they ask for the ``default_models`` fixture: the classical
    fallback, "no weights installed" and the official-parity tests stay what they test, and stay fast. (This patch
    is in-process only: test_default_install.py and the demo test run `deepisles` as a fresh process, which sees
    the packaged models as a normal install does.)"""
    if "default_models" in request.fixturenames:
        return
    from deepisles.members import base

    monkeypatch.setattr(base, "DEFAULT_MODELS_DIR", tmp_path_factory.getbasetemp() / "no-default-models")


@pytest.fixture
def default_models() -> Path:
    """The default models shipped in the package (trained by scripts/train_default_models.py)."""
    from deepisles.members import base

    missing = [m for m in ("seals", "nvauto", "factorizer") if not base.has_default_model(m)]
    assert not missing, f"packaged default models missing: {missing} (src/deepisles/default_models)"
    return base.DEFAULT_MODELS_DIR
