"""Clinical numbers beyond volume and count: lesion location (hemisphere, AAL3 regions, lobes) after an affine
registration to MNI152, and the DWI-FLAIR mismatch as a relative FLAIR signal intensity (rSI).

Every definition is in docs/biomarkers.md; :func:`compute_biomarkers` is what ``segment()`` calls.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.postprocess.atlas import (
    LOBES,
    TEMPLATE,
    Atlas,
    MniRegistration,
    atlas_record,
    load_atlas,
    register_to_mni,
)
from deepisles.postprocess.lesions import ranked_lesions, voxel_centres_mm

#: A region or lobe is listed for a lesion when it holds at least this fraction of the lesion's voxels.
MIN_REGION_FRACTION = 0.05
#: Regions listed for the whole lesion mask (``report["lesions"]["regions"]``), at most.
MAX_CASE_REGIONS = 10
#: A lesion is "bilateral" when each hemisphere holds at least this fraction of its voxels.
BILATERAL_MIN_FRACTION = 0.10
#: rSI at or below this value: "likely within 4.5 h" (FLAIR SIR <= 1.18 for onset < 4.5 h, Eur Rev Med
#: Pharmacol Sci 2022, doi:10.26355/eurrev_202202_27992; the same value separated < 6 h in Legge et al. 2017).
RSI_CUTOFF = 1.18
RSI_REFERENCE = (
    "FLAIR signal-intensity ratio <= 1.18 predicted symptom onset < 4.5 h (sensitivity 0.77, specificity 0.77): "
    "'Use of multiparametric magnetic resonance imaging as a screening tool for the determination of acute "
    "ischemic stroke onset time', Eur Rev Med Pharmacol Sci 2022, doi:10.26355/eurrev_202202_27992; see also "
    "Legge et al., J Stroke Cerebrovasc Dis 2017;26:1582-1587 (<= 1.18 for < 6 h) and Petkova et al., "
    "Radiology 2010;257:782-792 (3 h window)"
)
RSI_CAVEAT = (
    "research estimate, not validated for treatment decisions: the cut-off comes from manually drawn regions "
    "on other scanners; here the lesion is the automatic mask and the reference its mirror image through an "
    "affine MNI registration"
)
#: rSI needs a mirrored reference for at least this fraction of the lesion voxels.
MIN_MIRROR_FRACTION = 0.25


def _hemisphere(left: float, right: float) -> str | None:
    """left / right / bilateral from voxel counts left (MNI x < 0) and right (x >= 0) of the midline."""
    total = left + right
    if total <= 0:
        return None
    if min(left, right) / total >= BILATERAL_MIN_FRACTION:
        return "bilateral"
    return "left" if left > right else "right"


def _fractions(ids: np.ndarray, weights_total: int, names) -> list[tuple[str, float]]:
    """(name, fraction of ``weights_total``) for every non-zero id, largest first."""
    values, counts = np.unique(ids[ids > 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    return [(names(int(values[i])), float(counts[i]) / weights_total) for i in order]


def lesion_location(mask: Image, reg: MniRegistration, atlas: Atlas | None = None) -> tuple[list[dict], dict]:
    """Per lesion (ids as in ``lesion_table``) and for the whole mask: hemisphere, AAL3 regions, lobes.

    Every lesion voxel centre is mapped to MNI mm with ``reg``; its AAL3 region and lobe are read from the
    nearest atlas voxel. Returns ``(rows, case)``; each row: ``id``, ``hemisphere``, ``regions`` (list of
    ``{"name", "fraction"}``, fraction >= MIN_REGION_FRACTION), ``lobes`` (names, same rule),
    ``atlas_unlabelled_fraction`` (voxels outside AAL3's grey-matter labels, e.g. white matter) and
    ``centroid_mni``. ``case``: ``hemisphere``, ``lobes``, ``regions``.
    """
    atlas = atlas or load_atlas()
    labels, n = ranked_lesions(mask.data)
    if n == 0:
        return [], {"hemisphere": None, "lobes": [], "regions": []}
    ijk = np.argwhere(labels > 0)
    lab = labels[tuple(ijk.T)]
    mni = reg.to_mni(voxel_centres_mm(mask, ijk))
    region = atlas.region_ids(mni)
    lobe = atlas.lobe_ids(mni)
    left = mni[:, 0] < 0
    rows = []
    for k in range(1, n + 1):
        sel = lab == k
        total = int(sel.sum())
        regions = _fractions(region[sel], total, lambda i: atlas.names.get(i, str(i)))
        lobes = _fractions(lobe[sel], total, lambda i: LOBES[i - 1])
        n_left = int(left[sel].sum())
        rows.append(
            {
                "id": k,
                "hemisphere": _hemisphere(n_left, total - n_left),
                "regions": [{"name": r, "fraction": round(f, 3)} for r, f in regions if f >= MIN_REGION_FRACTION],
                "lobes": [name for name, f in lobes if f >= MIN_REGION_FRACTION],
                "atlas_unlabelled_fraction": round(float(np.mean(region[sel] == 0)), 3),
                "centroid_mni": [round(float(v), 1) for v in mni[sel].mean(axis=0)],
            }
        )
    sides = {r["hemisphere"] for r in rows}
    if "bilateral" in sides or {"left", "right"} <= sides:
        hemisphere = "bilateral"
    else:
        hemisphere = next(iter(sides))
    lobe_total = _fractions(lobe, len(lobe), lambda i: LOBES[i - 1])
    listed = {name for r in rows for name in r["lobes"]}
    case = {
        "hemisphere": hemisphere,
        "lobes": [name for name, _ in lobe_total if name in listed],
        "regions": [
            {"name": r, "fraction": round(f, 3)}
            for r, f in _fractions(region, len(region), lambda i: atlas.names.get(i, str(i)))[:MAX_CASE_REGIONS]
            if f >= MIN_REGION_FRACTION
        ],
    }
    return rows, case


def flair_rsi(mask: Image, flair: Image, brain: np.ndarray, reg: MniRegistration) -> dict:
    """Relative FLAIR signal intensity of the lesion against its mirror image in the other hemisphere.

    For each lesion voxel centre p: m = MNI(p), mirrored m' = (-m_x, m_y, m_z), p' = MNI^-1(m'); FLAIR is read
    at p' (trilinear). A pair counts when p' lies in the brain mask, outside the lesion mask and where FLAIR
    is non-zero, and FLAIR at p is non-zero. ``rsi = mean FLAIR(p) / mean FLAIR(p')`` over those pairs.
    ``flair`` must be on the mask's grid (as ``case.flair``).
    """
    out = {"rsi": None, "cutoff": RSI_CUTOFF, "likely_within_4_5h": None, "reference": RSI_REFERENCE,
           "caveat": RSI_CAVEAT}  # fmt: skip
    lesion = np.asarray(mask.data) > 0
    ijk = np.argwhere(lesion)
    if len(ijk) == 0:
        return {**out, "reason": "no lesion"}
    data = np.asarray(flair.data, dtype=np.float32)
    mni = reg.to_mni(voxel_centres_mm(mask, ijk))
    mirrored = reg.from_mni(mni * np.array([-1.0, 1.0, 1.0]))
    inv = np.linalg.inv(mask.affine)
    vox = mirrored @ inv[:3, :3].T + inv[:3, 3]
    near = np.rint(vox).astype(np.int64)
    inside = np.all((near >= 0) & (near < np.array(lesion.shape)), axis=1)
    near = np.clip(near, 0, np.array(lesion.shape) - 1)
    mirror_val = ndi.map_coordinates(data, vox.T, order=1, mode="constant", cval=0.0)
    lesion_val = data[tuple(ijk.T)]
    ok = inside & np.asarray(brain, dtype=bool)[tuple(near.T)] & ~lesion[tuple(near.T)]
    ok &= (mirror_val > 0) & (lesion_val > 0)
    fraction = float(ok.mean())
    out["mirror_fraction"] = round(fraction, 3)
    if fraction < MIN_MIRROR_FRACTION:
        return {**out, "reason": f"only {fraction:.0%} of the lesion voxels have a mirrored reference in healthy "
                                 f"brain (needs {MIN_MIRROR_FRACTION:.0%})"}  # fmt: skip
    rsi = float(lesion_val[ok].mean() / mirror_val[ok].mean())
    out["rsi"] = round(rsi, 4)
    out["likely_within_4_5h"] = bool(rsi <= RSI_CUTOFF)
    return out


def compute_biomarkers(
    mask: Image, dwi: Image, brain: np.ndarray, flair: Image | None = None
) -> tuple[list[dict], dict]:
    """Location and mismatch for ``segment()``: ``(rows, sections)``.

    ``rows``: per-lesion location fields (merge into ``lesion_table`` rows by ``id``). ``sections``:
    ``lesions`` (case-level hemisphere, lobes, regions), ``location`` (template, atlas, registration),
    ``mismatch`` (rSI) and ``warnings``. The registration is skipped when there is no lesion; a failed or
    poor registration leaves the location empty (``null``) or flagged, with a warning, never an exception.
    """
    location = {"template": TEMPLATE, "atlas": atlas_record(), "registration": None}
    no_flair = {"rsi": None, "cutoff": RSI_CUTOFF, "likely_within_4_5h": None, "reference": RSI_REFERENCE,
                "caveat": RSI_CAVEAT}  # fmt: skip
    empty_case = {"hemisphere": None, "lobes": [], "regions": []}
    warnings: list[str] = []
    if not np.any(mask.data):
        location["registration"] = {"skipped": "no lesion"}
        reason = "no FLAIR given" if flair is None else "no lesion"
        return [], {"lesions": empty_case, "location": location, "mismatch": {**no_flair, "reason": reason},
                    "warnings": warnings}  # fmt: skip
    try:
        reg = register_to_mni(dwi, brain)
    except DeepIslesError as exc:
        location["registration"] = {"ok": False, "error": str(exc)}
        warnings.append(f"lesion location not reported: {exc}")
        reason = "no FLAIR given" if flair is None else f"no MNI registration for the mirrored reference ({exc})"
        return [], {"lesions": empty_case, "location": location, "mismatch": {**no_flair, "reason": reason},
                    "warnings": warnings}  # fmt: skip
    location["registration"] = reg.info
    if not reg.info["ok"]:
        warnings.append(
            f"MNI registration looks poor (brain Dice {reg.info['brain_dice']:.2f}, scales {reg.info['scales']}): "
            "hemisphere, regions, lobes and rSI may be wrong"
        )
    rows, case = lesion_location(mask, reg)
    if flair is None:
        mismatch = {**no_flair, "reason": "no FLAIR given"}
    else:
        mismatch = flair_rsi(mask, flair, brain, reg)
    return rows, {"lesions": case, "location": location, "mismatch": mismatch, "warnings": warnings}
