"""preview.png: DWI, ADC (and FLAIR) with the lesion outlined on the slices holding most lesion."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nibabel.orientations import apply_orientation, io_orientation  # noqa: E402

from deepisles.io.image import Image  # noqa: E402
from deepisles.io.write import write_with_atomic  # noqa: E402

_VIEWS = ("axial", "coronal", "sagittal")


def _to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array reoriented so axes run R, A, S (nearest orthogonal axes), and its voxel sizes."""
    ornt = io_orientation(affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out = apply_orientation(data, ornt)
    return out, spacing[np.argsort(ornt[:, 0])]


def _slices_with_most_lesion(mask_ras: np.ndarray) -> tuple[int, int, int]:
    """Index along S (axial), A (coronal), R (sagittal) holding the most lesion voxels (centre if none)."""
    if not mask_ras.any():
        return tuple(int(s // 2) for s in (mask_ras.shape[2], mask_ras.shape[1], mask_ras.shape[0]))
    return (
        int(np.argmax(mask_ras.sum(axis=(0, 1)))),
        int(np.argmax(mask_ras.sum(axis=(0, 2)))),
        int(np.argmax(mask_ras.sum(axis=(1, 2)))),
    )


def _plane(vol: np.ndarray, view: str, idx: int) -> np.ndarray:
    # returned as rows = vertical screen axis (displayed with origin="lower")
    if view == "axial":
        return vol[:, :, idx].T  # x: R->, y: A^
    if view == "coronal":
        return vol[:, idx, :].T  # x: R->, y: S^
    return vol[idx, :, :].T  # x: A->, y: S^


def _aspect(spacing: np.ndarray, view: str) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[view]


def render_preview(
    path: Path,
    images: dict[str, Image],
    mask: Image,
    title: str = "",
    brain: Image | None = None,
) -> Path:
    """Write the preview PNG atomically; ``images`` maps a label (DWI, ADC, FLAIR) to an Image on the mask grid.

    The lesion is outlined in red; ``brain`` (the brain mask used), when given, in thin cyan."""
    mask_ras, spacing = _to_ras(np.asarray(mask.data) > 0, mask.affine)
    brain_ras = _to_ras(np.asarray(brain.data) > 0, brain.affine)[0] if brain is not None else None
    idx = dict(zip(_VIEWS, _slices_with_most_lesion(mask_ras), strict=True))
    rows = [(label, _to_ras(np.asarray(img.data, dtype=np.float32), img.affine)[0]) for label, img in images.items()]
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.5 * len(rows)), squeeze=False, facecolor="black")
    for r, (label, vol) in enumerate(rows):
        nz = vol[vol != 0]
        lo, hi = (np.percentile(nz, [1, 99.5]) if nz.size else (0.0, 1.0))
        if label.upper() == "ADC":
            lo, hi = 0.0, min(float(hi), 2.0) if hi > 0 else 1.0
        for c, view in enumerate(_VIEWS):
            ax = axes[r, c]
            ax.imshow(_plane(vol, view, idx[view]), cmap="gray", vmin=lo, vmax=hi, origin="lower",
                      aspect=_aspect(spacing, view), interpolation="nearest")
            if brain_ras is not None:
                b = _plane(brain_ras, view, idx[view])
                if b.any() and not b.all():
                    ax.contour(b.astype(float), levels=[0.5], colors="#30d0ff", linewidths=0.5, alpha=0.7)
            m = _plane(mask_ras, view, idx[view])
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors="#ff3030", linewidths=0.9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label} {view} {idx[view]}", color="white", fontsize=9)
            if view != "sagittal":
                ax.text(0.95, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=8, va="center")
    if title:
        fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()

    def _save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")

    try:
        return write_with_atomic(Path(path), _save)
    finally:
        plt.close(fig)
