"""Classical threshold member: DWI-bright and ADC-dark voxels relative to the patient's own brain.

No trained weights. It is what deepisles runs when no deep-learning weights are installed, and the
report labels it so. The method (documented in docs/classical-member.md):

1. Reference tissue: brain voxels at least ``edge_mm`` from the brain surface with ADC in
   (0.2, 1.5) x10^-3 mm^2/s (parenchyma, not CSF). Its medians ``dwi_ref`` and ``adc_ref`` and the
   robust spread ``dwi_mad`` (1.4826 x median absolute deviation) normalise the patient's own contrast.
2. Soft evidence per voxel: ``p_dwi = sigmoid((dwi - (dwi_ref + dwi_z * dwi_mad)) / (0.5 * dwi_mad))``
   (DWI hyperintensity) and ``p_adc = sigmoid((adc_ratio * adc_ref - adc) / (0.05 * adc_ref))``
   (restricted diffusion). Probability = ``p_dwi * p_adc`` inside the brain, 0 outside and within
   ``edge_mm`` of the surface (EPI edge artefacts are DWI-bright and ADC-dark).
3. Clean-up: the binary mask (probability >= 0.5) loses components smaller than ``min_lesion_ml``
   (26-connectivity); their voxels' probability is capped below 0.5 so probability and mask agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cc3d
import numpy as np
from scipy import ndimage as ndi

from deepisles.members.base import Case, Context, Member, MemberResult
from deepisles.members.config import Settings, require


@dataclass(frozen=True)
class ClassicalParams(Settings):
    """The classical member's settings (it has no stored weights; these are its whole configuration)."""

    dwi_z: float = 3.0  # DWI above reference median by this many robust SDs
    adc_ratio: float = 0.85  # ADC below this fraction of the reference tissue median
    edge_mm: float = 4.0  # ignore this rim of the brain (EPI edge artefacts)
    min_lesion_ml: float = 0.02  # drop smaller connected components
    csf_adc: float = 1.5  # reference tissue: ADC below this (10^-3 mm^2/s)

    def validate(self, where: str) -> None:
        require(self.dwi_z > 0 and 0 < self.adc_ratio < 1, where, "dwi_z must be > 0 and adc_ratio in (0, 1)")
        require(self.edge_mm >= 0 and self.min_lesion_ml >= 0 and self.csf_adc > 0.2, where,
                "edge_mm and min_lesion_ml must be >= 0, csf_adc > 0.2")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


@dataclass
class ClassicalContext(Context):
    voxel_volume_ml: float = 1.0


class ClassicalMember(Member):
    name = "classical"
    modalities = ("dwi", "adc")
    required = ("dwi", "adc")

    def __init__(self, params: ClassicalParams | None = None, fallback: bool = False):
        self.params = params or ClassicalParams()
        self.fallback = fallback
        self.description = (
            "classical threshold method (DWI-bright, ADC-dark relative to the patient's own brain); "
            "not a deep-learning model"
            + ("; used because no trained weights are installed" if fallback else "")
        )
        self.last_info = {}

    # step 1: the patient's own reference tissue (the "network input" is the images relative to it)
    def preprocess(self, case: Case, label: np.ndarray | None = None) -> tuple[dict, ClassicalContext]:
        p = self.params
        dwi = np.asarray(case.dwi.data, dtype=np.float32)
        adc = np.asarray(case.adc.data, dtype=np.float32)
        brain = np.asarray(case.brain, dtype=bool)
        inner = ndi.distance_transform_edt(brain, sampling=case.dwi.spacing) > p.edge_mm
        if inner.sum() < 100:  # tiny brains / thin slabs: keep the whole brain
            inner = brain
        ref = inner & (adc > 0.2) & (adc < p.csf_adc)
        if ref.sum() < 100:
            ref = brain & (adc > 0)
        dwi_ref = float(np.median(dwi[ref]))
        dwi_mad = float(1.4826 * np.median(np.abs(dwi[ref] - dwi_ref))) or max(dwi_ref * 0.1, 1e-6)
        adc_ref = float(np.median(adc[ref]))
        info = {"dwi_reference_median": round(dwi_ref, 4), "dwi_reference_mad": round(dwi_mad, 4),
                "adc_reference_median": round(adc_ref, 4)}
        x = {"dwi": dwi, "adc": adc, "inner": inner, "dwi_ref": dwi_ref, "dwi_mad": dwi_mad, "adc_ref": adc_ref}
        lab = None if label is None else (np.asarray(label) >= 0.5).astype(np.uint8)
        return x, ClassicalContext(tuple(case.dwi.shape), lab, info, case.dwi.voxel_volume_ml)

    # step 2: soft evidence per voxel
    def infer(self, x: dict) -> np.ndarray:
        p = self.params
        p_dwi = _sigmoid((x["dwi"] - (x["dwi_ref"] + p.dwi_z * x["dwi_mad"])) / (0.5 * x["dwi_mad"]))
        p_adc = _sigmoid((p.adc_ratio * x["adc_ref"] - x["adc"]) / (0.05 * x["adc_ref"]))
        prob = (p_dwi * p_adc).astype(np.float32)
        prob[~x["inner"]] = 0.0
        return prob

    # step 3: clean-up on the binary decision (the probability is already on the DWI grid)
    def export(self, prob: np.ndarray, context: ClassicalContext) -> MemberResult:
        binary = prob >= self.threshold
        labels = cc3d.connected_components(binary, connectivity=26)
        min_vox = self.params.min_lesion_ml / context.voxel_volume_ml
        counts = np.bincount(labels.ravel())
        small = np.flatnonzero(counts < min_vox)
        small = small[small > 0]
        if small.size:
            drop = np.isin(labels, small)
            prob[drop] = np.minimum(prob[drop], np.float32(0.49))
        context.info["components_removed"] = int(small.size)
        return self.result(prob, context)

    def report_info(self) -> dict:
        return {**super().report_info(), "parameters": asdict(self.params)}
