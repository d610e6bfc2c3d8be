"""The Image type: a 3D voxel array that always travels with its affine (voxel index -> RAS+ mm)."""

from __future__ import annotations

from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import SimpleITK as sitk

# LPS (ITK, DICOM) <-> RAS (NIfTI/nibabel) flips the first two world axes; the matrix is its own inverse.
# The one definition in deepisles: registration, atlas and DICOM SEG import it.
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_TO_RAS = RAS_FROM_LPS[:3, :3]


@dataclass
class Image:
    """A 3D image on an explicit grid.

    ``data`` is indexed ``[i, j, k]`` exactly as nibabel does, and ``affine`` maps ``(i, j, k, 1)`` to
    RAS+ millimetres. ``source`` names where it came from (for error messages and reports).
    """

    data: np.ndarray
    affine: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    def with_data(self, data: np.ndarray, **meta) -> Image:
        """Same grid, new voxels."""
        if tuple(data.shape[:3]) != self.shape[:3]:
            raise ValueError(f"shape {data.shape} does not match grid {self.shape}")
        return Image(data, self.affine.copy(), self.source, {**self.meta, **meta})

    def same_grid(self, other: Image, atol: float = 1e-3) -> bool:
        return self.shape[:3] == other.shape[:3] and bool(np.allclose(self.affine, other.affine, atol=atol))

    # --- conversions -------------------------------------------------------------------------
    def to_nifti(self, dtype=None) -> nib.Nifti1Image:
        data = self.data if dtype is None else self.data.astype(dtype)
        img = nib.Nifti1Image(data, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img

    @classmethod
    def from_nifti(cls, img: nib.spatialimages.SpatialImage, source: str = "") -> Image:
        return cls(np.asarray(img.dataobj), img.affine, source)

    def to_sitk(self) -> sitk.Image:
        """SimpleITK image on the same physical grid (ITK arrays are [k, j, i], world is LPS)."""
        arr = np.ascontiguousarray(np.asarray(self.data).transpose(2, 1, 0))
        out = sitk.GetImageFromArray(arr)
        m = self.affine[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        direction = _LPS_TO_RAS @ (m / spacing)
        origin = _LPS_TO_RAS @ self.affine[:3, 3]
        out.SetSpacing([float(s) for s in spacing])
        out.SetDirection([float(v) for v in direction.ravel()])
        out.SetOrigin([float(v) for v in origin])
        return out

    @classmethod
    def from_sitk(cls, img: sitk.Image, source: str = "") -> Image:
        arr = sitk.GetArrayFromImage(img)
        if arr.ndim == 3:
            data = arr.transpose(2, 1, 0)
        elif arr.ndim == 4 and img.GetNumberOfComponentsPerPixel() == 1:
            data = arr.transpose(3, 2, 1, 0)
        else:
            data = np.moveaxis(arr, -1, 0).T if arr.ndim == 4 else arr.T
        return cls(np.asarray(data), sitk_affine(img), source)


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """RAS+ voxel-to-world affine of the first three axes of a SimpleITK image."""
    dim = img.GetDimension()
    direction = np.array(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.array(img.GetSpacing(), dtype=np.float64)[:3]
    origin = np.array(img.GetOrigin(), dtype=np.float64)[:3]
    aff = np.eye(4)
    aff[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    aff[:3, 3] = _LPS_TO_RAS @ origin
    return aff
