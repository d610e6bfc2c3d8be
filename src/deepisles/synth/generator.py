"""generate_case(): one synthetic acute-stroke case (DWI, ADC, FLAIR, expert-like mask) from real anatomy;
write_dataset(): many of them in the ISLES'22 folder layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from deepisles.errors import DeepIslesError
from deepisles.io.image import Image
from deepisles.io.write import check_output_dir, write_json_atomic, write_nifti_atomic, write_text_atomic
from deepisles.progress import Progress, as_progress
from deepisles.synth.acquisition import active_voxels, make_grid, subsample_factors, supersample
from deepisles.synth.anatomy import Template, load_template
from deepisles.synth.artefacts import grid_artefacts, susceptibility
from deepisles.synth.contrast import (
    B_VALUE,
    DIPY_B0_SNR,
    SignalMaps,
    TissueParams,
    bias_field,
    rician,
    signal_maps,
    subject_tissue,
)
from deepisles.synth.deform import SubjectWarp, rigid
from deepisles.synth.lesions import sample_lesions

LESION_FREE_P = 0.12
MASK_COVERAGE = 0.5  # a DWI voxel is lesion when >= 50 % of it is infarcted tissue
_MIN_VISIBLE_COVERAGE = 0.2  # ... but a lesion an expert can see gets at least its best-covered voxel
ADC_MAX = 5.0


@dataclass
class SynthCase:
    """One synthetic case: DWI (b=1000 trace), ADC (10^-3 mm^2/s) and mask share the DWI grid; FLAIR has its own."""

    dwi: Image
    adc: Image
    flair: Image | None
    mask: Image
    meta: dict


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index`` of a dataset drawn with ``seed`` (independent of the dataset size)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def generate_case(
    seed: int | np.random.Generator, *, lesion: bool | None = None, with_flair: bool = True
) -> SynthCase:
    """Draw one case. Same ``seed`` -> same case; ``lesion=None`` draws lesion-free cases ~12 % of the time.

    Independent random streams drive subject, lesions, contrast, DWI and FLAIR, so ``with_flair=False`` and
    forcing ``lesion`` (to what the draw would have given) leave everything else unchanged.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(int(seed))
    u_lesion = rng.random()
    r_subject, r_lesion, r_contrast, r_dwi, r_flair, r_epi, r_grid = rng.spawn(7)
    has_lesion = (u_lesion >= LESION_FREE_P) if lesion is None else bool(lesion)

    template = load_template()
    atrophy = float(r_subject.beta(2.0, 2.0))
    warp = SubjectWarp.random(r_subject, template, atrophy)
    tissue = TissueParams.random(r_subject, atrophy)

    subject = subject_tissue(template, tissue)
    if has_lesion:
        lesions = sample_lesions(r_lesion, template, subject.tissue, warp.ml_per_template_voxel)
        labels = lesions.labels
        lesion_params = {
            les.label: (les.adc_drop, les.t2_increase, les.flair_increase) for les in lesions.lesions
        }
    else:
        lesions = None
        labels = np.zeros(template.shape, np.uint8)
        lesion_params = {}
    maps = signal_maps(r_contrast, template, subject, tissue, labels, lesion_params)
    epi = susceptibility(r_epi, template, maps.s0, maps.sb)

    dwi, adc, mask, dwi_meta, lesion_voxels = _acquire_dwi(r_dwi, template, warp, maps, labels, r_grid)
    dwi_meta["artefacts"] = {**epi, **dwi_meta.get("artefacts", {})}
    flair, flair_meta = _acquire_flair(r_flair, template, warp, maps) if with_flair else (None, None)

    lesion_list = []
    if lesions is not None:
        vox_ml = mask.voxel_volume_ml
        for les in lesions.lesions:
            d = les.as_dict()
            d["mask_volume_ml"] = round(lesion_voxels.get(les.label, 0) * vox_ml, 4)
            lesion_list.append(d)
    meta = {
        "generator": "deepisles.synth",
        "seed": int(seed) if not isinstance(seed, np.random.Generator) else None,
        "lesion": bool(has_lesion),
        "scenario": lesions.scenario if lesions else "none",
        "onset_hours": lesions.onset_hours if lesions else None,
        "flair_visible": bool(lesions.flair_visible) if lesions else False,
        "lesions": lesion_list,
        "n_lesions": len(lesion_list),
        "lesion_volume_ml": round(sum(d["volume_ml"] for d in lesion_list), 4),
        "mask_volume_ml": round(float(mask.data.sum()) * mask.voxel_volume_ml, 4),
        "spacing": dwi_meta["spacing"],
        "noise_sigma": dwi_meta["noise_sigma"],
        "snr": dwi_meta["snr"],
        "dwi": dwi_meta,
        "flair": flair_meta,
        "atrophy": round(atrophy, 3),
        "tissue": tissue.as_dict(),
        "head": warp.meta,
        "anatomy": "MNI152 2009 (nilearn) GM/WM/brain, CSF = brain - GM - WM",
    }
    return SynthCase(dwi=dwi, adc=adc, flair=flair, mask=mask, meta=meta)


def _noisy(rng, values: np.ndarray, voxels: np.ndarray, sigma: float, corr: float) -> np.ndarray:
    """Rician noise on a sparse set of voxels (N,), with spatial correlation computed on their bounding box."""
    lo = voxels.min(axis=0)
    shape = tuple(int(v) for v in voxels.max(axis=0) + 1 - lo)
    box = np.zeros(shape, np.float32)
    loc = tuple((voxels - lo).T)
    box[loc] = values
    return rician(rng, box, sigma, corr)[loc]


def _acquire_dwi(
    rng: np.random.Generator, template: Template, warp: SubjectWarp, maps: SignalMaps, labels: np.ndarray,
    r_grid: np.random.Generator | None = None,
) -> tuple[Image, Image, Image, dict, dict[int, int]]:
    inplane = float(rng.uniform(1.0, 2.0))
    thick = float(rng.uniform(2.0, 5.0))
    grid = make_grid(
        rng, warp.world_extent_points(), (inplane, inplane, thick), max_oblique_deg=10.0,
        fov_inplane_mm=float(rng.uniform(200, 250)), margin_mm=float(rng.uniform(4, 16)),
    )  # fmt: skip

    pull = warp.pullback(distort=True)
    vox = active_voxels(grid, pull, template.reach)
    vals, per_label = supersample(
        grid, vox, pull,
        {"brain": maps.brain, "s0": maps.s0, "sb": maps.sb, "lesion": maps.lesion},
        intensity=("s0", "sb"), threshold=("lesion",), labels=labels,
    )  # fmt: skip
    inb = vals["brain"] >= 0.5
    bvox = vox[inb]

    bias_amp = float(rng.uniform(0.04, 0.18))
    bias = bias_field(rng, grid.world(bvox), grid.world(bvox).mean(axis=1), bias_amp)
    s0 = vals["s0"][inb] * bias
    sb = vals["sb"][inb] * bias
    target = float(rng.uniform(195.0, 270.0))  # brain median of the real ISLES'22 DWI is ~230
    scale = target / float(np.median(sb))
    s0 *= scale
    sb *= scale
    artefacts: dict = {}
    if r_grid is not None:  # Gibbs ringing, N/2 ghost, b0/b1000 motion on the scanner grid (before noise)
        loc = tuple(bvox.T)
        full0, fullb = np.zeros(grid.shape, np.float32), np.zeros(grid.shape, np.float32)
        inside = np.zeros(grid.shape, bool)
        full0[loc], fullb[loc], inside[loc] = s0, sb, True
        thick = grid.meta["axis_order"].index(2)  # slices are stacked along S (make_grid's physical axis 2)
        inplane = tuple(a for a in range(3) if a != thick)
        phase = next((a for a in inplane if grid.meta["axis_order"][a] == 1), inplane[-1])  # the A-P axis
        full0, fullb, artefacts = grid_artefacts(r_grid, full0, fullb, inside, inplane, phase)
        s0, sb = full0[loc], fullb[loc]
    # SNR of the trace image relative to the brain median; b0 has one average vs three directions
    snr = float(rng.uniform(0.7, 1.5) * DIPY_B0_SNR)
    sigma = target / snr
    corr = float(rng.uniform(0.3, 0.8))
    sb_n = _noisy(rng, sb, bvox, sigma, corr)
    s0_n = _noisy(rng, s0, bvox, sigma * np.sqrt(3.0), corr)
    adc = np.log(np.maximum(s0_n, 1e-3) / np.maximum(sb_n, 1e-3)) / (B_VALUE / 1000.0)
    adc = np.clip(adc, 0.0, ADC_MAX)

    dwi_arr = np.zeros(grid.shape, np.float32)
    adc_arr = np.zeros(grid.shape, np.float32)
    msk_arr = np.zeros(grid.shape, np.uint8)
    loc = tuple(bvox.T)
    dwi_arr[loc] = sb_n
    adc_arr[loc] = adc

    # expert-like mask: >= 50 % coverage, inside the brain; every visible lesion keeps its best voxel
    cover = vals["lesion"]
    lesion_rows = np.flatnonzero((cover >= MASK_COVERAGE) & inb)
    best_lab = np.zeros(len(vox), np.int32)
    best_cov = np.zeros(len(vox), np.float32)
    for k, (rows, cov) in sorted(per_label.items()):
        better = cov > best_cov[rows]
        best_cov[rows[better]] = cov[better]
        best_lab[rows[better]] = k
    counts: dict[int, int] = {}
    for k, (rows, cov) in sorted(per_label.items()):
        in_mask = np.isin(rows, lesion_rows) & (best_lab[rows] == k)
        if not in_mask.any():
            ok = inb[rows]
            if ok.any() and cov[ok].max() >= _MIN_VISIBLE_COVERAGE:
                r = rows[ok][int(np.argmax(cov[ok]))]
                lesion_rows = np.append(lesion_rows, r)
                best_lab[r] = k
    lesion_rows = np.unique(lesion_rows)
    msk_arr[tuple(vox[lesion_rows].T)] = 1
    for k in per_label:
        counts[k] = int(np.sum(best_lab[lesion_rows] == k))

    axcodes = "".join(nib.aff2axcodes(grid.affine))
    meta = {
        "spacing": [round(float(s), 3) for s in grid.spacing],
        "shape": list(grid.shape),
        "axcodes": axcodes,
        **grid.meta,
        "subsamples": list(subsample_factors(grid)),
        "b_value": B_VALUE,
        "intensity_scale": round(scale, 3),
        "snr": round(snr, 2),
        "noise_sigma": round(sigma, 3),
        "noise_correlation_vox": round(corr, 3),
        "bias_amplitude": round(bias_amp, 3),
        "artefacts": artefacts,
    }
    src = "synth"
    return (
        Image(dwi_arr, grid.affine, src, {"modality": "dwi"}),
        Image(adc_arr, grid.affine.copy(), src, {"modality": "adc"}),
        Image(msk_arr, grid.affine.copy(), src, {"modality": "msk"}),
        meta,
        counts,
    )


def _acquire_flair(
    rng: np.random.Generator, template: Template, warp: SubjectWarp, maps: SignalMaps
) -> tuple[Image, dict]:
    # the head moved between the DWI and the FLAIR: a few degrees, a few mm (the two are NOT registered)
    angles = rng.normal(0.0, 2.0, 3).clip(-5, 5)
    shift = rng.normal(0.0, 2.5, 3).clip(-6, 6)
    motion = rigid(angles, shift)
    pts = warp.world_extent_points() @ motion[:3, :3].T + motion[:3, 3]
    if rng.random() < 0.6:  # 2D axial turbo-FLAIR
        inplane = float(rng.uniform(0.7, 1.0))
        spacing = (inplane, inplane, float(rng.uniform(4.0, 6.0)))
        kind, fov = "2D", float(rng.uniform(210, 250))
    else:  # 3D FLAIR, isotropic
        iso = float(rng.uniform(0.9, 1.2))
        spacing, kind, fov = (iso, iso, iso), "3D", None
    grid = make_grid(
        rng, pts, spacing, max_oblique_deg=12.0, fov_inplane_mm=fov, margin_mm=float(rng.uniform(4, 14))
    )

    pull = warp.pullback(extra_pose=motion)
    vox = active_voxels(grid, pull, template.reach)
    vals, _ = supersample(grid, vox, pull, {"brain": maps.brain, "flair": maps.flair})
    inb = vals["brain"] >= 0.5
    bvox = vox[inb]
    bias_amp = float(rng.uniform(0.05, 0.2))
    world = grid.world(bvox)
    sig = vals["flair"][inb] * bias_field(rng, world, world.mean(axis=1), bias_amp)
    target = float(rng.uniform(250.0, 500.0))
    scale = target / float(np.median(sig))
    sig *= scale
    snr = float(rng.uniform(15.0, 35.0))
    sigma = target / snr
    n1 = rng.standard_normal(sig.shape, dtype=np.float32)
    n2 = rng.standard_normal(sig.shape, dtype=np.float32)
    noisy = np.sqrt((sig + sigma * n1) ** 2 + (sigma * n2) ** 2)
    arr = np.zeros(grid.shape, np.float32)
    arr[tuple(bvox.T)] = noisy
    meta = {
        "kind": kind,
        "spacing": [round(float(s), 3) for s in grid.spacing],
        "shape": list(grid.shape),
        "axcodes": "".join(nib.aff2axcodes(grid.affine)),
        **grid.meta,
        "motion_rotation_deg": [round(float(a), 2) for a in angles],
        "motion_shift_mm": [round(float(s), 2) for s in shift],
        "snr": round(snr, 2),
        "noise_sigma": round(sigma, 3),
        "bias_amplitude": round(bias_amp, 3),
    }
    return Image(arr, grid.affine, "synth", {"modality": "flair"}), meta


# --- dataset ---------------------------------------------------------------------------------------------


def _nifti(img: Image, dtype) -> nib.Nifti1Image:
    out = img.to_nifti(dtype=dtype)
    out.header.set_xyzt_units("mm", "sec")
    return out


def write_dataset(
    outdir: Path,
    n: int,
    seed: int,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> list[str]:
    """Write ``n`` cases in the ISLES'22 layout under ``outdir``; returns the subject ids.

    ``rawdata/sub-synthNNNN/ses-0001/sub-synthNNNN_ses-0001_{dwi,adc,flair}.nii.gz``,
    ``derivatives/sub-synthNNNN/ses-0001/sub-synthNNNN_ses-0001_msk.nii.gz``, ``rawdata/participants.tsv``,
    ``dataset_description.json`` files and ``synth_manifest.json`` (per-case meta). Case ``i`` depends only on
    ``(seed, i)``. Refuses an ``outdir`` that holds rawdata/derivatives unless ``overwrite``.
    ``progress.advance(done, n, subject)`` after each written case (:mod:`deepisles.progress`).
    """
    outdir = Path(outdir)
    n = int(n)
    if n < 1:
        raise DeepIslesError(f"number of cases must be at least 1, got {n}")
    check_output_dir(outdir, ["rawdata", "derivatives"], overwrite)
    subjects: list[str] = []
    records: list[dict] = []
    progress = as_progress(progress)
    for i in range(n):
        sub = f"sub-synth{i + 1:04d}"
        case = generate_case(case_rng(seed, i))
        case.meta["seed"] = int(seed)
        case.meta["index"] = i
        raw = outdir / "rawdata" / sub / "ses-0001"
        der = outdir / "derivatives" / sub / "ses-0001"
        stem = f"{sub}_ses-0001"
        files = {
            "dwi": raw / f"{stem}_dwi.nii.gz",
            "adc": raw / f"{stem}_adc.nii.gz",
            "msk": der / f"{stem}_msk.nii.gz",
        }
        write_nifti_atomic(files["dwi"], _nifti(case.dwi, np.float32))
        write_nifti_atomic(files["adc"], _nifti(case.adc, np.float32))
        if case.flair is not None:
            files["flair"] = raw / f"{stem}_flair.nii.gz"
            write_nifti_atomic(files["flair"], _nifti(case.flair, np.float32))
        write_nifti_atomic(files["msk"], _nifti(case.mask, np.uint8))
        subjects.append(sub)
        records.append(
            {"subject": sub, "files": {k: str(v.relative_to(outdir)) for k, v in files.items()}, **case.meta}
        )
        progress.advance(i + 1, n)

    desc = {
        "Name": "deepisles synthetic acute stroke (ISLES'22 layout)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "deepisles.synth", "Description": f"seed={seed}, n={n}"}],
    }
    write_json_atomic(outdir / "rawdata" / "dataset_description.json", desc)
    write_json_atomic(
        outdir / "derivatives" / "dataset_description.json",
        {**desc, "Name": "deepisles synthetic lesion masks", "DatasetType": "derivative"},
    )
    header = ["participant_id", "lesion", "n_lesions", "lesion_volume_ml", "mask_volume_ml", "scenario",
              "flair_visible", "dwi_spacing"]  # fmt: skip
    rows = ["\t".join(header)]
    for r in records:
        rows.append(
            "\t".join(
                str(v)
                for v in (
                    r["subject"],
                    int(r["lesion"]),
                    r["n_lesions"],
                    r["lesion_volume_ml"],
                    r["mask_volume_ml"],
                    r["scenario"],
                    int(r["flair_visible"]),
                    "x".join(f"{s:g}" for s in r["spacing"]),
                )  # fmt: skip
            )
        )
    write_text_atomic(outdir / "rawdata" / "participants.tsv", "\n".join(rows) + "\n")
    write_json_atomic(outdir / "synth_manifest.json", {"generator": "deepisles.synth", "seed": int(seed), "n": n,
                                                       "cases": records})  # fmt: skip
    return subjects
