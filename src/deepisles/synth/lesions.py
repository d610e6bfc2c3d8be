"""Infarct-like lesions drawn in template (MNI) space: territorial wedges, cortical, subcortical, lacunar, emboli,
showers of tiny emboli and satellites around a main infarct.

Every lesion grows the same way: inside a bounding box around its centre, each allowed voxel (brain tissue of
the right territory and hemisphere, not yet taken) gets a score ``-distance/size + smooth noise`` (plus, for
territorial infarcts, a cone term that points from a deep "feeding artery" apex to the cortex); the ``k`` best
voxels form the lesion, where ``k`` is the target volume in template voxels. That gives an exact volume, an
irregular boundary from the smoothed noise and shapes that follow the anatomy. Territory borders are computed
from randomly jittered MNI coordinates so they are not planes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from deepisles.synth.anatomy import (
    ACA,
    BRAINSTEM,
    CEREBELLUM,
    DEEP_MCA,
    MCA,
    PCA,
    TERRITORY_NAMES,
    THALAMUS,
    Template,
    territories,
)
from deepisles.synth.fields import smooth_noise

MIN_VOLUME_ML = 0.01  # one 2 mm voxel is 0.008 mL: real expert masks hold single-voxel components
MAX_VOLUME_ML = 200.0

# Real ISLES'22 masks are dominated by many tiny components: the shared case 0001 has 31 (median 0.09 mL),
# the masks-only case 0003 one 29 mL infarct with 45 satellites of 0.008-0.16 mL. Showers and satellites model that.
SCENARIOS = {
    "territorial": 0.14,
    "cortical": 0.10,
    "subcortical": 0.09,
    "lacunar": 0.10,
    "embolic": 0.15,
    "shower": 0.20,
    "territorial+emboli": 0.22,
}
_VOLUME_RANGE_ML = {
    "territorial": (8.0, 180.0),
    "cortical": (0.3, 15.0),
    "subcortical": (0.8, 35.0),
    "lacunar": (0.03, 1.5),
    "embolus": (MIN_VOLUME_ML, 2.0),
    "tiny": (MIN_VOLUME_ML, 0.4),
}

# Lesion contrast in infarcted tissue. ADC: ratio to normal tissue (rADC) about 0.5-0.8 in the first day and rising
# towards normal over days (pseudonormalisation; Schlaug et al., Neurology 1997;49:113-119; Lansberg et al.,
# AJNR 2001;22:637-644); the core threshold used clinically is ADC < 0.62 x 10^-3 mm^2/s (Purushotham et al.,
# Int J Stroke 2015;10:348-353), i.e. rADC ~0.7 - so much of a DWI lesion lies between 0.62 and normal. Drawn per
# lesion: drop = 1 - rADC from a Beta(2.2, 3.5) on [0.08, 0.6] (mean ~0.27), smaller late after onset.
ADC_DROP_RANGE = (0.08, 0.6)
ADC_DROP_BETA = (2.2, 3.5)
_TERRITORY_WEIGHTS = {
    "territorial": {MCA: 0.6, PCA: 0.18, ACA: 0.12, CEREBELLUM: 0.10},
    "cortical": {MCA: 0.65, PCA: 0.15, ACA: 0.12, CEREBELLUM: 0.08},
}
# deep "feeding artery" apex of each territory's wedge, MNI mm (x given for the right hemisphere)
_APEX_MM = {
    MCA: (18.0, 4.0, -4.0),
    ACA: (4.0, 22.0, -8.0),
    PCA: (10.0, -22.0, -8.0),
    CEREBELLUM: (8.0, -42.0, -32.0),
}


@dataclass
class Lesion:
    label: int
    type: str
    territory: str
    hemisphere: str
    volume_ml: float
    centre_mni: list
    adc_drop: float
    t2_increase: float
    flair_increase: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class LesionSet:
    labels: np.ndarray  # uint8 on the template grid, 0 = none, k = lesion k
    lesions: list[Lesion]
    scenario: str
    onset_hours: float
    flair_visible: bool


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _pick(rng: np.random.Generator, weights: dict):
    keys = list(weights)
    p = np.array([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


class _Painter:
    """Grows lesions one after another into a shared label volume."""

    def __init__(
        self,
        rng: np.random.Generator,
        template: Template,
        tissue: np.ndarray,
        ml_per_voxel: Callable[[np.ndarray], np.ndarray],
    ):
        self.rng = rng
        self.t = template
        self.ml_per_voxel = ml_per_voxel  # physical mL of one template voxel at MNI positions (N, 3)
        self.labels = np.zeros(template.shape, np.uint8)
        self.tissue = tissue  # this subject's GM+WM fraction: lesions are tissue, never CSF
        self.gm_smooth = template.derived["gm_smooth"]
        self.lesions: list[Lesion] = []
        # this subject's territories: borders from MNI coordinates jittered by a smooth ~6 mm field, and a
        # slightly wavy midline
        jit = [template.mni[a] + 6.0 * smooth_noise(rng, template.shape, 5.0) for a in range(3)]
        self.territory = territories(jit, self.tissue)
        self.right = (template.mni[0] + 2.0 * smooth_noise(rng, template.shape, 4.0)) >= 0

    # --- centres -------------------------------------------------------------------------------
    def _centre(self, candidates: np.ndarray) -> np.ndarray | None:
        flat = np.flatnonzero(candidates & (self.labels == 0))
        if flat.size == 0:
            return None
        return np.array(np.unravel_index(int(self.rng.choice(flat)), self.t.shape))

    def _side(self, hemisphere: str) -> np.ndarray:
        x = self.t.mni[0]
        return x >= 0 if hemisphere == "R" else x < 0

    def cortical_centre(self, territory: int, hemisphere: str) -> np.ndarray | None:
        cand = (self.t.gm > 0.5) & (self.t.territory == territory) & self._side(hemisphere)
        return self._centre(cand)

    def deep_centre(self, hemisphere: str, lacunar: bool) -> np.ndarray | None:
        t = self.t
        x, y, z = t.mni
        ax = np.abs(x)
        corona = (t.territory == MCA) & (t.wm > 0.7) & (ax < 32) & (z > 4) & (z < 40) & (y > -40) & (y < 30)
        deep = (t.territory == DEEP_MCA) | corona
        if lacunar:
            deep |= (t.territory == THALAMUS) | ((t.territory == BRAINSTEM) & (z < -14) & (z > -45))
        cand = deep & (self.tissue > 0.7)
        if hemisphere in ("L", "R"):
            cand &= self._side(hemisphere) | (t.territory == BRAINSTEM)
        return self._centre(cand)

    # --- growing ---------------------------------------------------------------------------------
    def _bbox(self, centre: np.ndarray, half_mm: float) -> tuple[slice, slice, slice]:
        h = int(np.ceil(half_mm / self.t.spacing))
        return tuple(
            slice(max(int(c) - h, 0), min(int(c) + h + 1, n))
            for c, n in zip(centre, self.t.shape, strict=True)
        )

    def _noise(self, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
        return smooth_noise(self.rng, shape, sigma_vox)

    def grow(
        self,
        centre: np.ndarray,
        volume_ml: float,
        *,
        kind: str,
        territory: int,
        hemisphere: str,
        allowed_territories: set[int] | None,
        axes: tuple[float, float, float] = (1.0, 1.0, 1.0),
        rotation: np.ndarray | None = None,
        noise_amp: float = 0.35,
        noise_sigma_vox: float = 1.5,
        cone_apex_mm: np.ndarray | None = None,
        gm_only: bool = False,
        params: tuple[float, float, float] = (0.45, 0.1, 0.0),
    ) -> Lesion | None:
        t = self.t
        centre_mm = t.affine[:3, :3] @ centre + t.affine[:3, 3]
        ml_vox = float(self.ml_per_voxel(centre_mm[None])[0])
        k = int(max(np.ceil(MIN_VOLUME_ML / ml_vox), round(volume_ml / ml_vox)))
        r_eq = (3 * k * t.voxel_volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)  # template mm
        if cone_apex_mm is not None:  # the whole hemisphere
            box = list(self._bbox(centre, 200.0))
            mid = int(round(-t.affine[0, 3] / t.spacing))
            box[0] = slice(max(mid - 6, 0), None) if hemisphere == "R" else slice(0, mid + 7)
            box = tuple(box)
        else:
            box = self._bbox(centre, float(np.clip(3.0 * r_eq * max(axes) + 6.0, 10.0, 80.0)))
        shape = self.labels[box].shape

        allowed = (self.tissue[box] >= 0.5) & (self.labels[box] == 0)
        if gm_only:
            allowed &= self.gm_smooth[box] > 0.3
        if allowed_territories is not None:
            terr = self.territory[box]
            allowed &= np.isin(terr, list(allowed_territories))
            side = self.right[box] if hemisphere == "R" else ~self.right[box]
            allowed &= side | (terr == BRAINSTEM)  # the brainstem may cross the midline
        if not allowed.any():
            return None

        rel = [t.mni[a][box] - centre_mm[a] for a in range(3)]
        rot = np.eye(3) if rotation is None else rotation
        dist2 = np.zeros(shape, np.float32)
        for a in range(3):
            comp = rot[0, a] * rel[0] + rot[1, a] * rel[1] + rot[2, a] * rel[2]
            dist2 += (comp / axes[a]) ** 2
        score = -np.sqrt(dist2) / max(r_eq, 1.0)
        if cone_apex_mm is not None:
            v = _unit(centre_mm - cone_apex_mm)
            d = [t.mni[a][box] - cone_apex_mm[a] for a in range(3)]
            r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-3
            cos = (d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / r
            reach = float(np.linalg.norm(centre_mm - cone_apex_mm))
            # a wedge: angular closeness to the apex->centre axis, favouring the cortical (distal) end
            score = 2.5 * cos + 0.35 * score + 0.4 * np.clip(r / reach, 0, 1.1)
        score += noise_amp * self._noise(shape, noise_sigma_vox)

        cand = np.flatnonzero(allowed)
        kmax = min(cand.size, 2 * k + 16)
        vals = score.ravel()[cand]
        if cand.size > kmax:
            top = np.argpartition(-vals, kmax - 1)[:kmax]
            cand, vals = cand[top], vals[top]
        ranked = cand[np.argsort(-vals, kind="stable")]
        # the physical size of a template voxel varies over a large lesion (atrophy/elastic Jacobian):
        # re-estimate it on the chosen voxels and adjust k (twice is plenty)
        for _ in range(2):
            chosen = ranked[:k]
            pick = chosen if chosen.size <= 256 else chosen[:: int(np.ceil(chosen.size / 256))]
            ijk = np.stack(np.unravel_index(pick, shape), axis=1) + [b.start for b in box]
            ml_vox = float(np.mean(self.ml_per_voxel(ijk * t.spacing + t.affine[:3, 3])))
            k = int(min(ranked.size, max(np.ceil(MIN_VOLUME_ML / ml_vox), round(volume_ml / ml_vox))))
        cand = ranked[:k]
        label = len(self.lesions) + 1
        sub = np.zeros(shape, bool)
        sub.ravel()[cand] = True
        self.labels[box][sub] = label
        n = int(sub.sum())
        if n == 0:
            return None
        ijk = np.argwhere(sub).mean(axis=0) + [s.start for s in box]
        mni = t.affine[:3, :3] @ ijk + t.affine[:3, 3]
        drop, t2, flair = params
        lesion = Lesion(
            label=label,
            type=kind,
            territory=TERRITORY_NAMES[territory],
            hemisphere=hemisphere if territory != BRAINSTEM else ("R" if mni[0] >= 0 else "L"),
            volume_ml=round(n * ml_vox, 4),
            centre_mni=[round(float(c), 1) for c in mni],
            adc_drop=round(drop, 3),
            t2_increase=round(t2, 3),
            flair_increase=round(flair, 3),
        )
        self.lesions.append(lesion)
        return lesion


def sample_lesions(
    rng: np.random.Generator,
    template: Template,
    tissue: np.ndarray,
    ml_per_voxel: Callable[[np.ndarray], np.ndarray],
) -> LesionSet:
    """Draw a stroke scenario and paint its lesions into voxels with ``tissue`` (GM+WM fraction) >= 0.5.

    ``ml_per_voxel(mni_mm (N, 3))``: physical mL of one template voxel there.
    """
    p = _Painter(rng, template, tissue, ml_per_voxel)
    scenario = _pick(rng, SCENARIOS)
    onset = _log_uniform(rng, 0.5, 48.0)  # hours since onset
    # FLAIR turns positive a few hours after onset (FLAIR-DWI mismatch before ~4.5 h)
    flair_visible = bool(onset > rng.uniform(3.0, 6.0))
    t2_base = 0.05 + 0.4 * float(np.clip((onset - 1.0) / 24.0, 0.0, 1.0))

    late = float(np.clip((onset - 24.0) / 24.0, 0.0, 1.0))  # pseudonormalisation begins after ~1 day

    def params() -> tuple[float, float, float]:
        lo, hi = ADC_DROP_RANGE
        drop = float(lo + (hi - lo) * rng.beta(*ADC_DROP_BETA) * (1.0 - 0.4 * late))
        t2 = float(np.clip(t2_base * rng.uniform(0.7, 1.3), 0.0, 0.55))
        fl = (
            float(rng.uniform(0.15, 0.3) + 0.35 * np.clip((onset - 4.5) / 24.0, 0, 1))
            if flair_visible
            else 0.0
        )
        return drop, t2, fl

    hemisphere = "L" if rng.random() < 0.5 else "R"
    budget = MAX_VOLUME_ML * 0.97

    def territorial(volume: float) -> None:
        terr = _pick(rng, _TERRITORY_WEIGHTS["territorial"])
        centre = p.cortical_centre(terr, hemisphere)
        if centre is None:
            return
        allowed = {terr}
        if terr == MCA and rng.random() < 0.7:
            allowed.add(DEEP_MCA)  # proximal (M1) occlusion: lenticulostriate territory too
        if terr == PCA and rng.random() < 0.5:
            allowed.add(THALAMUS)
        sx = 1.0 if hemisphere == "R" else -1.0
        apex = np.array(_APEX_MM[terr]) * [sx, 1.0, 1.0]
        p.grow(
            centre, volume, kind="territorial", territory=terr, hemisphere=hemisphere,
            allowed_territories=allowed, cone_apex_mm=apex, noise_amp=0.25, noise_sigma_vox=2.5,
            params=params(),
        )  # fmt: skip

    def cortical(
        volume: float, terr: int | None = None, side: str | None = None, kind: str = "cortical"
    ) -> None:
        terr = terr or _pick(rng, _TERRITORY_WEIGHTS["cortical"])
        side = side or hemisphere
        centre = p.cortical_centre(terr, side)
        if centre is None:
            return
        allowed = {terr, DEEP_MCA} if terr == MCA else {terr}
        p.grow(
            centre, volume, kind=kind, territory=terr, hemisphere=side, allowed_territories=allowed,
            noise_amp=0.45, noise_sigma_vox=1.5, gm_only=rng.random() < 0.6, params=params(),
            axes=(1.0, float(rng.uniform(1.0, 1.8)), 1.0), rotation=_random_rotation(rng),
        )  # fmt: skip

    def deep(volume: float, lacunar: bool, side: str | None = None, kind: str | None = None) -> None:
        side = side or hemisphere
        centre = p.deep_centre(side, lacunar)
        if centre is None:
            return
        terr_here = int(template.territory[tuple(centre)])
        if lacunar:
            axes = (1.0, 1.0, float(rng.uniform(1.2, 2.0)))  # perforators run vertically
            rot, amp = None, 0.1
        else:
            axes = (1.0, float(rng.uniform(1.2, 2.2)), float(rng.uniform(1.0, 1.6)))
            rot, amp = _random_rotation(rng), 0.3
        p.grow(
            centre, volume, kind=kind or ("lacunar" if lacunar else "subcortical"), territory=terr_here,
            hemisphere=side, allowed_territories={terr_here, DEEP_MCA, MCA, THALAMUS, BRAINSTEM},
            axes=axes, rotation=rot, noise_amp=amp, noise_sigma_vox=1.2, params=params(),
        )  # fmt: skip

    def emboli(n: int, home: int, size: str = "embolus") -> None:
        for _ in range(n):
            left = budget - sum(les.volume_ml for les in p.lesions)
            if left < 0.5:
                break
            vol = min(_log_uniform(rng, *_VOLUME_RANGE_ML[size]), left)
            u = rng.random()
            side = hemisphere if u < 0.75 else ("R" if hemisphere == "L" else "L")
            if rng.random() < 0.75:
                terr = home if rng.random() < 0.6 else _pick(rng, _TERRITORY_WEIGHTS["cortical"])
                cortical(vol, terr=terr, side=side, kind="embolic-cortical")
            else:
                deep(vol, lacunar=False, side=side, kind="embolic-subcortical")

    if scenario == "territorial":
        territorial(_log_uniform(rng, *_VOLUME_RANGE_ML["territorial"]))
    elif scenario == "cortical":
        cortical(_log_uniform(rng, *_VOLUME_RANGE_ML["cortical"]))
    elif scenario == "subcortical":
        deep(_log_uniform(rng, *_VOLUME_RANGE_ML["subcortical"]), lacunar=False)
    elif scenario == "lacunar":
        deep(_log_uniform(rng, *_VOLUME_RANGE_ML["lacunar"]), lacunar=True)
        if rng.random() < 0.2:  # a second, independent lacune
            deep(_log_uniform(rng, *_VOLUME_RANGE_ML["lacunar"]), lacunar=True)
    elif scenario == "embolic":
        n = int(min(2 + rng.geometric(0.3), 14))
        emboli(n, _pick(rng, _TERRITORY_WEIGHTS["cortical"]))
    elif scenario == "shower":  # many tiny emboli, a few of them larger
        emboli(int(rng.integers(8, 41)), _pick(rng, _TERRITORY_WEIGHTS["cortical"]), size="tiny")
        emboli(int(rng.integers(0, 4)), MCA)
    else:  # territorial + emboli: a main infarct with small satellites
        territorial(_log_uniform(rng, 2.0, 120.0))
        emboli(int(rng.integers(1, 5)), MCA)
        emboli(int(rng.integers(0, 31)), MCA, size="tiny")

    if not p.lesions:  # every draw failed (never seen in practice): fall back to one cortical MCA lesion
        cortical(_log_uniform(rng, *_VOLUME_RANGE_ML["cortical"]), terr=MCA)
    return LesionSet(p.labels, p.lesions, scenario, round(onset, 2), flair_visible)
