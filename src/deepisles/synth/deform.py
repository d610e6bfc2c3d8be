"""Where the subject's head is and how its brain differs from the template: one pull-back transform.

A point in scanner millimetres is mapped to template voxel indices in four steps:

1. head pose (rigid) and head size (anisotropic scale): ``world = R @ (S @ m) + t``  ->  ``m``
2. smooth random elastic displacement (a few mm) and central atrophy (ventricles/deep structures enlarged)
3. optionally EPI susceptibility distortion along the phase-encoding (A-P) axis near the sinuses, with the
   matching intensity pile-up/drop-out (Jacobian), for the DWI/ADC acquisition only
4. MNI mm -> template voxel indices

Sampling the template through this map directly (one interpolation) avoids re-sampling a warped copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from deepisles.synth.anatomy import Template
from deepisles.synth.fields import interp_separable

_ELASTIC_STEP_MM = 15.0
_VENTRICLE_CENTRE_MM = np.array([0.0, -8.0, 12.0])
_VENTRICLE_SIGMA_MM = 28.0
# susceptibility sources: orbitofrontal (frontal sinus / orbits) and both temporal poles (mastoids)
_SINUSES_MM = np.array([[0.0, 38.0, -22.0], [36.0, 12.0, -36.0], [-36.0, 12.0, -36.0]])
_SINUS_SIGMA_MM = np.array([14.0, 12.0, 12.0])
_SINUS_WEIGHT = np.array([1.0, 0.7, 0.7])


def rotation(angles_deg) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, y, z (applied in that order)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(angles_deg, translation_mm) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = rotation(angles_deg)
    out[:3, 3] = translation_mm
    return out


@dataclass
class SubjectWarp:
    """Pull-back from scanner mm to template voxel indices (see module docstring)."""

    template: Template
    pose: np.ndarray  # 4x4: MNI-like subject mm -> scanner mm (rigid @ scale)
    elastic: np.ndarray  # (3, nx, ny, nz) displacement in mm on a coarse grid
    elastic_origin: np.ndarray
    central_atrophy: float
    distortion_mm: float = 0.0
    meta: dict = field(default_factory=dict)

    @classmethod
    def random(cls, rng: np.random.Generator, template: Template, atrophy: float) -> SubjectWarp:
        angles = np.array([rng.normal(0, 6.0), rng.normal(0, 3.0), rng.normal(0, 4.0)]).clip(-14, 14)
        shift = rng.normal(0, 12.0, 3).clip(-30, 30)
        # the MNI152 brain is larger than most patients' (and the real ISLES'22 case: ~1.2 L inside its mask)
        size = rng.uniform(0.84, 0.97) * rng.uniform(0.96, 1.04, 3) * (1.0 - 0.04 * atrophy)
        pose = rigid(angles, shift) @ np.diag([*size, 1.0])

        lo = template.affine[:3, 3] - 20.0
        hi = template.affine[:3, 3] + template.spacing * (np.array(template.shape) - 1) + 20.0
        n = np.ceil((hi - lo) / _ELASTIC_STEP_MM).astype(int) + 1
        field_ = ndi.gaussian_filter(rng.standard_normal((3, *n)), (0, 1.2, 1.2, 1.2), mode="nearest")
        rms = float(np.sqrt(np.mean(np.sum(field_**2, axis=0))))
        amp = rng.uniform(1.5, 4.0)
        field_ *= amp / max(rms, 1e-9)

        distortion = float(rng.uniform(1.5, 5.0) * rng.choice([-1.0, 1.0]))
        meta = {
            "head_rotation_deg": [round(float(a), 2) for a in angles],
            "head_shift_mm": [round(float(s), 2) for s in shift],
            "head_scale": [round(float(s), 3) for s in size],
            "elastic_rms_mm": round(float(amp), 2),
            "central_atrophy": round(float(0.35 * atrophy), 3),
            "epi_distortion_mm": round(distortion, 2),
        }
        return cls(template, pose, field_.astype(np.float32), lo, 0.35 * atrophy, distortion, meta)

    def world_extent_points(self, step: int = 3) -> np.ndarray:
        """Scanner-mm positions (N, 3) of a subsample of brain voxels (affine part only), for sizing grids."""
        t = self.template
        ijk = np.argwhere(t.brain[::step, ::step, ::step] > 0.5) * step
        mni = ijk * t.spacing + t.affine[:3, 3]
        return mni @ self.pose[:3, :3].T + self.pose[:3, 3]

    def ml_per_template_voxel(self, mni_mm: np.ndarray) -> np.ndarray:
        """Physical mL of one template voxel at MNI positions (N, 3): head size, elastic and atrophy Jacobian."""
        mni = np.atleast_2d(np.asarray(mni_mm, dtype=np.float64))
        w0 = mni @ self.pose[:3, :3].T + self.pose[:3, 3]  # forward map, affine part (the Jacobian is smooth)
        h = 2.0
        steps = np.concatenate([np.eye(3), -np.eye(3)]) * h  # (6, 3)
        pts = (w0[:, None, :] + steps[None, :, :]).reshape(-1, 3).T
        idx, _ = self.to_template(pts)
        idx = idx.T.reshape(len(mni), 6, 3)
        jac = (idx[:, :3, :] - idx[:, 3:, :]) / (2 * h)  # d template index / d scanner mm
        return 1.0 / np.maximum(np.abs(np.linalg.det(jac)), 1e-9) / 1000.0

    def pullback(self, extra_pose: np.ndarray | None = None, distort: bool = False) -> Pullback:
        """The scanner-mm -> template-index map of one acquisition.

        ``extra_pose`` is a rigid head motion (4x4, scanner mm) applied after the subject pose, e.g. between the
        DWI and the FLAIR acquisition; ``distort`` adds the EPI susceptibility distortion.
        """
        pose = self.pose if extra_pose is None else extra_pose @ self.pose
        return Pullback(self, np.linalg.inv(pose), distort)

    def to_template(
        self, world: np.ndarray, extra_pose: np.ndarray | None = None, distort: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scanner mm (3, N) -> template voxel indices (3, N), and the EPI intensity factor (N,) if ``distort``."""
        return self.pullback(extra_pose, distort)(world)

    def nonlinear(self, m: np.ndarray, distort: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Displacement (3, N) in mm to add to MNI-like positions ``m`` (3, N), and the EPI intensity factor."""
        # elastic displacement (pull-back), trilinear on the coarse grid
        c = (m - self.elastic_origin[:, None]) / _ELASTIC_STEP_MM
        disp = np.stack([ndi.map_coordinates(self.elastic[a], c, order=1, mode="nearest") for a in range(3)])
        del c
        # central atrophy: sample closer to the centre -> ventricles and deep structures look larger
        if self.central_atrophy > 0:
            d = m - _VENTRICLE_CENTRE_MM[:, None]
            g = np.exp(-np.sum(d * d, axis=0) / (2 * _VENTRICLE_SIGMA_MM**2))
            disp -= self.central_atrophy * g * d
            del d, g
        jac = None
        if distort and self.distortion_mm != 0:
            q = m + disp
            shift = np.zeros(m.shape[1])
            dshift = np.zeros(m.shape[1])
            for centre, sigma, w in zip(_SINUSES_MM, _SINUS_SIGMA_MM, _SINUS_WEIGHT, strict=True):
                d = q - centre[:, None]
                g = w * self.distortion_mm * np.exp(-np.sum(d * d, axis=0) / (2 * sigma**2))
                shift += g
                dshift += -g * d[1] / sigma**2
            disp[1] += shift
            jac = np.clip(1.0 + dshift, 0.25, 2.5)
        return disp, jac


@dataclass
class Pullback:
    """Scanner mm -> template voxel indices for one acquisition (see :meth:`SubjectWarp.pullback`)."""

    warp: SubjectWarp
    inv_pose: np.ndarray
    distort: bool

    def _to_index(self, m: np.ndarray) -> np.ndarray:
        t = self.warp.template
        return (m - t.affine[:3, 3][:, None]) / t.spacing

    def __call__(self, world: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        m = self.inv_pose[:3, :3] @ world + self.inv_pose[:3, 3:4]
        disp, jac = self.warp.nonlinear(m, self.distort)
        return self._to_index(m + disp), jac

    def voxel_positions(self, affine: np.ndarray, voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """MNI positions (3, N) of the centres of ``voxels`` (N, 3) of a grid, and the EPI intensity factor (N,).

        The smooth non-linear part (elastic, atrophy, EPI distortion) is evaluated on a ~4 mm lattice of the grid
        and interpolated (it varies over centimetres); the affine part is exact.
        """
        voxels = np.asarray(voxels)
        lo, hi = voxels.min(axis=0), voxels.max(axis=0)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        stride = np.maximum(1, np.round(4.0 / spacing)).astype(int)
        axes = [np.arange(lo[a], hi[a] + stride[a], stride[a]) for a in range(3)]
        lattice = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1).astype(np.float64)
        lin = self.inv_pose @ affine
        disp, jac = self.warp.nonlinear(lin[:3, :3] @ lattice + lin[:3, 3:4], self.distort)
        shape = [len(a) for a in axes]
        pos = [(np.arange(lo[a], hi[a] + 1) - lo[a]) / stride[a] for a in range(3)]
        rel = tuple((voxels - lo).T)
        m = lin[:3, :3] @ voxels.T.astype(np.float64) + lin[:3, 3:4]
        for c in range(3):
            m[c] += interp_separable(disp[c].reshape(shape), pos)[rel]
        if jac is not None:
            jac = interp_separable(jac.reshape(shape), pos)[rel]
        return m, jac

    def subsample_indices(
        self, affine: np.ndarray, centres_mm: np.ndarray, offsets: np.ndarray
    ) -> np.ndarray:
        """Template indices (3, N*K) of sub-sample ``offsets`` (K, 3, voxel units) around voxel centres."""
        sub = self.inv_pose[:3, :3] @ affine[:3, :3] @ offsets.T  # (3, K) in MNI mm
        return self._to_index((centres_mm[:, :, None] + sub[:, None, :]).reshape(3, -1))
