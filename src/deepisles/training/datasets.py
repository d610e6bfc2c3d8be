"""Training cases: the dataset's cases (:mod:`deepisles.io.dataset`), K-fold splits, loading one case.

Cases are found by :func:`deepisles.io.dataset.find_cases` (the finder ``batch`` and ``evaluate`` use too; layouts
in its module docstring); a training case is a :class:`~deepisles.io.dataset.DatasetCase` with a mask.
"""

from __future__ import annotations

import numpy as np

from deepisles.errors import DeepIslesError, InputError
from deepisles.io.dataset import DatasetCase, find_cases
from deepisles.io.image import Image
from deepisles.io.load import LoadedInputs
from deepisles.io.read import read_image
from deepisles.io.validate import check_3d
from deepisles.preprocess.inputs import load_inputs

__all__ = ["find_cases", "load_case", "split_folds"]  # find_cases: the dataset finder, for the training loop


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise DeepIslesError(f"{name} must be an integer, got {value!r}")
    return int(value)


def split_folds(
    cases: list[DatasetCase], folds: int, fold: int, seed: int = 12345
) -> tuple[list[DatasetCase], list[DatasetCase]]:
    """``(train, val)`` of fold ``fold`` of a K-fold split by subject (all sessions of a subject together).

    Subjects are shuffled with ``numpy.random.default_rng(seed)`` and cut into ``folds`` near-equal groups;
    the same inputs always give the same split. ``folds=1`` -> ``(all cases, [])``. Both lists keep the
    order of ``cases``.
    """
    folds = _check_int(folds, "folds")
    fold = _check_int(fold, "fold")
    if folds < 1:
        raise DeepIslesError(f"folds must be at least 1, got {folds}")
    if not 0 <= fold < folds:
        raise DeepIslesError(f"fold must be in 0..{folds - 1} for {folds} folds, got {fold}")
    subjects = sorted({c.subject for c in cases})
    if len(subjects) < folds:
        raise DeepIslesError(
            f"cannot split {len(subjects)} subject(s) into {folds} folds: need at least one subject per fold"
        )
    if folds == 1:
        return list(cases), []
    order = np.random.default_rng(seed).permutation(len(subjects))
    val_idx = np.array_split(order, folds)[fold]
    val_subjects = {subjects[i] for i in val_idx}
    train = [c for c in cases if c.subject not in val_subjects]
    val = [c for c in cases if c.subject in val_subjects]
    return train, val


def load_case(case: DatasetCase, with_flair: bool = True) -> tuple[LoadedInputs, Image]:
    """Load a case with :func:`deepisles.preprocess.inputs.load_inputs` plus its mask (uint8 0/1 on the DWI grid).

    Raises :class:`InputError` when the mask is not on the DWI grid (shape and affine).
    """
    if case.mask is None:
        raise DeepIslesError(f"case {case.case_id} has no lesion mask")
    flair = case.flair if with_flair else None
    loaded = load_inputs(case.dwi, case.adc, flair)
    mask = check_3d(read_image(case.mask, "mask"), "mask")
    dwi = loaded.dwi
    if not mask.same_grid(dwi):
        if mask.shape[:3] != dwi.shape[:3]:
            detail = f"mask shape {mask.shape[:3]}, DWI shape {dwi.shape[:3]}"
        else:
            shift = float(np.abs(mask.affine - dwi.affine).max())
            detail = f"same shape {dwi.shape[:3]} but the affines differ by up to {shift:.3g}"
        raise InputError(case.mask, f"mask is not on the DWI grid ({detail}; DWI file {case.dwi})")
    data = np.asarray(mask.data)
    binary = np.where(np.isfinite(data), data, 0) > 0.5
    return loaded, mask.with_data(binary.astype(np.uint8))
