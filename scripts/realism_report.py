"""Compare synthetic cases (deepisles.synth) with the real ISLES'22 case: figures and a statistics table.

Writes docs/realism_real.png, docs/realism_synth.png (same layout: DWI/ADC slices with the lesion outline and
brain-vs-lesion histograms), docs/realism_gallery.png (several synthetic cases, DWI/ADC/FLAIR) and
docs/realism.md (DWI/ADC statistics, real vs synthetic mean +- sd). Only derived figures and numbers are written;
the real images are never copied.

    .venv/bin/python scripts/realism_report.py [--n 20] [--seed 0] [--real DIR] [--out docs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

from deepisles.io.image import Image  # noqa: E402
from deepisles.io.write import write_text_atomic, write_with_atomic  # noqa: E402
from deepisles.synth import case_rng, generate_case  # noqa: E402
from deepisles.synth.anatomy import load_template  # noqa: E402
from deepisles.synth.contrast import DIPY_B0_CSF_RATIO, DIPY_B0_SNR, dipy_b0_path, measure_dipy_b0  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DWI_WINDOW = (0, 600)
ADC_WINDOW = (0, 3.5)


def default_real_dir() -> Path:
    env = os.environ.get("DEEPISLES_ISLES22_DIR")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "isles22"
    return root / "sub-strokecase0001"


def canonical(img: Image) -> tuple[np.ndarray, np.ndarray]:
    """Array in closest-RAS orientation and its voxel sizes (for display only)."""
    can = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(img.data), img.affine))
    return np.asarray(can.dataobj), np.array(can.header.get_zooms()[:3])


def stats(dwi: Image, adc: Image, msk: Image) -> dict:
    d, a, m = np.asarray(dwi.data, float), np.asarray(adc.data, float), np.asarray(msk.data) > 0
    brain = d > 0
    normal = brain & ~m & (a < 1.5) & (a > 0.1)  # parenchyma outside the lesion (CSF excluded)
    p5, p50, p95 = np.percentile(d[brain], [5, 50, 95])
    a5, a50, a95 = np.percentile(a[brain], [5, 50, 95])
    core = ndi.binary_erosion(brain, iterations=2) & normal
    hp = d - ndi.median_filter(d, size=3)
    out = {
        "spacing_mm": "x".join(f"{s:.2g}" for s in dwi.spacing),
        "slice_mm": float(max(dwi.spacing)),
        "inplane_mm": float(min(dwi.spacing)),
        "brain_ml": float(brain.sum() * dwi.voxel_volume_ml),
        "dwi_p5": p5,
        "dwi_median": p50,
        "dwi_p95": p95,
        "adc_p5": a5,
        "adc_median": a50,
        "adc_p95": a95,
        "adc_normal_median": float(np.median(a[normal])),
        "csf_fraction": float((a[brain] > 2.0).mean()),
        "dwi_noise_rel": float(1.4826 * np.median(np.abs(hp[core])) / np.median(d[core])),
        "lesion_ml": float(m.sum() * dwi.voxel_volume_ml),
        "n_components": int(ndi.label(m, structure=np.ones((3, 3, 3)))[1]),
    }
    if m.any():
        out |= {
            "lesion_dwi_median": float(np.median(d[m])),
            "lesion_dwi_p95": float(np.percentile(d[m], 95)),
            "lesion_adc_median": float(np.median(a[m])),
            "lesion_dwi_ratio": float(np.median(d[m]) / p50),
            "lesion_dwi_p95_ratio": float(np.percentile(d[m], 95) / p50),
            "lesion_adc_ratio": float(np.median(a[m]) / np.median(a[normal])),
        }
        out |= component_stats(d, a, m, dwi.voxel_volume_ml, p50, float(np.median(a[normal])))
    return out


def component_stats(d, a, m, voxel_ml: float, dwi_ref: float, adc_ref: float) -> dict:
    """Per connected component (26-connectivity): volumes, and each component's median DWI / brain median and
    median ADC / normal parenchyma; summarised by median and spread (interquartile range) over the components."""
    lab, n = ndi.label(m, structure=np.ones((3, 3, 3)))
    idx = np.arange(1, n + 1)
    vol = ndi.sum(m, lab, idx) * voxel_ml
    dr = np.array(ndi.median(d, lab, idx)) / dwi_ref
    ar = np.array(ndi.median(a, lab, idx)) / adc_ref
    q = lambda v: float(np.subtract(*np.percentile(v, [75, 25])))  # noqa: E731
    return {
        "comp_volume_median": float(np.median(vol)),
        "comp_small_fraction": float(np.mean(vol <= 0.1)),
        "comp_dwi_ratio_median": float(np.median(dr)),
        "comp_dwi_ratio_iqr": q(dr),
        "comp_adc_ratio_median": float(np.median(ar)),
        "comp_adc_ratio_iqr": q(ar),
    }


def pick_slices(mask: np.ndarray, brain: np.ndarray, n: int = 4) -> list[int]:
    zs = np.flatnonzero(brain.any(axis=(0, 1)))
    lz = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = zs[0], zs[-1]
    base = [int(lo + f * (hi - lo)) for f in (0.25, 0.45, 0.62, 0.8)]
    if lz.size:
        area = mask.sum(axis=(0, 1))
        best = int(np.argmax(area))
        base[1] = best
        others = [z for z in lz if abs(z - best) > 3]
        if others:
            base[2] = int(others[len(others) // 2])
    return sorted(set(base))[:n]


def figure(title: str, dwi: Image, adc: Image, msk: Image, path: Path) -> None:
    d, zoom = canonical(dwi)
    a, _ = canonical(adc)
    m, _ = canonical(msk)
    m = m > 0
    brain = d > 0
    zs = pick_slices(m, brain)
    fig, axes = plt.subplots(2, len(zs) + 1, figsize=(3.2 * (len(zs) + 1), 6.6))
    aspect = zoom[1] / zoom[0]
    for c, z in enumerate(zs):
        for r, (arr, win, name) in enumerate(((d, DWI_WINDOW, "DWI"), (a, ADC_WINDOW, "ADC"))):
            ax = axes[r, c]
            ax.imshow(arr[:, :, z].T, origin="lower", cmap="gray", vmin=win[0], vmax=win[1], aspect=aspect)
            if m[:, :, z].any():
                ax.contour(m[:, :, z].T, [0.5], colors="r", linewidths=0.6)
            ax.set_title(f"{name} slice {z}", fontsize=8)
            ax.axis("off")
    for r, (arr, rng_, name) in enumerate(((d, (0, 800), "DWI"), (a, (0, 4), "ADC"))):
        ax = axes[r, -1]
        ax.hist(arr[brain & ~m], bins=80, range=rng_, density=True, alpha=0.6, label="brain", color="0.4")
        if m.any():
            ax.hist(arr[m], bins=40, range=rng_, density=True, alpha=0.6, label="lesion", color="r")
        ax.set_title(f"{name} histogram", fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    write_with_atomic(path, lambda p: fig.savefig(p, dpi=80, format="png"))
    plt.close(fig)


def gallery(cases: list, path: Path) -> None:
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3.1 * len(cases)))
    for r, (label, case) in enumerate(cases):
        d, zoom = canonical(case.dwi)
        a, _ = canonical(case.adc)
        m, _ = canonical(case.mask)
        m = m > 0
        brain = d > 0
        z = (
            int(np.argmax(m.sum(axis=(0, 1))))
            if m.any()
            else int(np.flatnonzero(brain.any(axis=(0, 1))).mean())
        )
        # the FLAIR slice nearest to the same scanner height (it is not registered to the DWI)
        world_z = (case.dwi.affine @ np.r_[np.array(d.shape) / 2, 1])[2]
        can = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(case.dwi.data), case.dwi.affine))
        world_z = (can.affine @ [d.shape[0] / 2, d.shape[1] / 2, z, 1])[2]
        fl = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(case.flair.data), case.flair.affine))
        fz = int(
            np.clip(round(np.linalg.solve(fl.affine, [*fl.affine[:2, 3], world_z, 1])[2]), 0, fl.shape[2] - 1)
        )
        f = np.asarray(fl.dataobj)
        fzoom = fl.header.get_zooms()
        brain_f = f[f > 0]
        for c, (arr, win, name, asp) in enumerate(
            (
                (d[:, :, z], DWI_WINDOW, "DWI", zoom[1] / zoom[0]),
                (a[:, :, z], ADC_WINDOW, "ADC", zoom[1] / zoom[0]),
                (f[:, :, fz], (0, float(np.percentile(brain_f, 99.5))), "FLAIR", fzoom[1] / fzoom[0]),
            )
        ):
            ax = axes[r, c]
            ax.imshow(arr.T, origin="lower", cmap="gray", vmin=win[0], vmax=win[1], aspect=asp)
            if c < 2 and m[:, :, z].any():
                ax.contour(m[:, :, z].T, [0.5], colors="r", linewidths=0.5)
            ax.set_title(f"{label} {name}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    write_with_atomic(path, lambda p: fig.savefig(p, dpi=60, format="png"))
    plt.close(fig)


def _fmt(v) -> str:
    if isinstance(v, str):
        return v
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def table(real: dict | None, synth: list[dict]) -> str:
    keys = [
        ("spacing_mm", "DWI voxel size (mm)"),
        ("brain_ml", "brain volume inside mask (mL)"),
        ("dwi_median", "DWI brain median"),
        ("dwi_p5", "DWI brain 5th pct"),
        ("dwi_p95", "DWI brain 95th pct"),
        ("dwi_noise_rel", "DWI high-pass MAD / median (parenchyma)"),
        ("adc_median", "ADC brain median (10^-3 mm^2/s)"),
        ("adc_p5", "ADC brain 5th pct"),
        ("adc_p95", "ADC brain 95th pct"),
        ("adc_normal_median", "ADC normal parenchyma median"),
        ("csf_fraction", "fraction of brain voxels with ADC > 2"),
        ("lesion_ml", "lesion volume in mask (mL)"),
        ("n_components", "lesion connected components"),
        ("lesion_dwi_median", "lesion DWI median"),
        ("lesion_dwi_ratio", "lesion / brain DWI median"),
        ("lesion_dwi_p95_ratio", "lesion 95th pct / brain DWI median"),
        ("lesion_adc_median", "lesion ADC median"),
        ("lesion_adc_ratio", "lesion / normal parenchyma ADC median"),
        ("comp_volume_median", "per component: median volume (mL)"),
        ("comp_small_fraction", "per component: fraction <= 0.1 mL"),
        ("comp_dwi_ratio_median", "per component: median of (DWI median / brain median)"),
        ("comp_dwi_ratio_iqr", "per component: IQR of that DWI ratio"),
        ("comp_adc_ratio_median", "per component: median of (ADC median / normal parenchyma)"),
        ("comp_adc_ratio_iqr", "per component: IQR of that ADC ratio"),
    ]
    lines = [
        "| statistic | real sub-strokecase0001 | synthetic mean ± sd | synthetic min – max | n |",
        "|---|---|---|---|---|",
    ]
    for k, name in keys:
        vals = [s[k] for s in synth if k in s]
        rv = _fmt(real[k]) if real and k in real else "–"
        if k == "spacing_mm":
            ip = [s["inplane_mm"] for s in synth]
            sl = [s["slice_mm"] for s in synth]
            syn = f"in-plane {np.mean(ip):.2f} ± {np.std(ip):.2f}, slice {np.mean(sl):.2f} ± {np.std(sl):.2f}"
            rng_ = f"{min(ip):.2f}–{max(ip):.2f} / {min(sl):.2f}–{max(sl):.2f}"
            lines.append(f"| {name} | {rv} | {syn} | {rng_} | {len(synth)} |")
            continue
        if not vals:
            continue
        lines.append(
            f"| {name} | {rv} | {_fmt(np.mean(vals))} ± {_fmt(np.std(vals))} | "
            f"{_fmt(min(vals))} – {_fmt(max(vals))} | {len(vals)} |"
        )
    return "\n".join(lines)


def masks_only_components(folder: Path) -> list[str]:
    """Component volumes of the real expert masks that come without images (shared/data/isles22/masks-only)."""
    rows = []
    for f in sorted(folder.glob("*_msk.nii*")):
        img = nib.load(str(f))
        m = np.asarray(img.dataobj) > 0
        lab, n = ndi.label(m, structure=np.ones((3, 3, 3)))
        vol = ndi.sum(m, lab, np.arange(1, n + 1)) * float(np.prod(img.header.get_zooms()[:3])) / 1000
        rows.append(f"| {f.name.split('_')[0]} | {n} | {m.sum() * float(np.prod(img.header.get_zooms()[:3])) / 1000:.2f} "
                    f"| {np.median(vol):.3f} | {np.mean(vol <= 0.1):.2f} |")  # fmt: skip
    if not rows:
        return []
    return ["Two more real expert masks (no images, `masks-only/`): lesion size structure only.", "",
            "| real mask | components | volume (mL) | median component (mL) | fraction <= 0.1 mL |",
            "|---|---|---|---|---|", *rows, ""]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", type=Path, default=default_real_dir())
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args(argv)

    real_stats = None
    files = {k: args.real / f"sub-strokecase0001_ses-0001_{k}.nii.gz" for k in ("dwi", "adc", "msk")}
    if all(p.exists() for p in files.values()):
        real = {k: Image.from_nifti(nib.load(str(p)), str(p)) for k, p in files.items()}
        real_stats = stats(real["dwi"], real["adc"], real["msk"])
        figure(
            "real ISLES'22 sub-strokecase0001",
            real["dwi"],
            real["adc"],
            real["msk"],
            args.out / "realism_real.png",
        )
    else:
        print(f"real case not found under {args.real}; synthetic statistics only", file=sys.stderr)

    t0 = time.perf_counter()
    load_template()
    t_template = time.perf_counter() - t0
    synth_stats, cases, times, cpu = [], [], [], []
    for i in range(args.n):
        t0, c0 = time.perf_counter(), time.process_time()
        case = generate_case(case_rng(args.seed, i))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        s = stats(case.dwi, case.adc, case.mask)
        s["scenario"] = case.meta["scenario"]
        s["artefacts"] = case.meta["dwi"].get("artefacts", {})
        synth_stats.append(s)
        cases.append((f"seed {args.seed} case {i} ({case.meta['scenario']})", case))
        print(
            f"case {i}: {times[-1]:.2f} s {case.meta['scenario']} lesion {s['lesion_ml']:.2f} mL",
            file=sys.stderr,
        )

    # the figure twin of the real case: a synthetic case with a lesion of comparable (small-to-medium) size
    with_lesion = [(lab, c) for lab, c in cases if c.mask.data.any()]
    rep = min(with_lesion, key=lambda lc: abs(np.log(max(lc[1].meta["mask_volume_ml"], 0.01) / 15.0)))
    figure(f"synthetic: {rep[0]}", rep[1].dwi, rep[1].adc, rep[1].mask, args.out / "realism_synth.png")
    gallery([lc for lc in cases if lc[1].flair is not None][:6], args.out / "realism_gallery.png")

    dipy = measure_dipy_b0() if dipy_b0_path() else None  # dipy is a dev-only dependency
    lesion_cases = [s for s in synth_stats if s["lesion_ml"] > 0]
    scen = {}
    for s in synth_stats:
        scen[s["scenario"]] = scen.get(s["scenario"], 0) + 1
    art = {"susceptibility pile-up/loss": sum(bool(s["artefacts"].get("susceptibility")) for s in synth_stats),
           "Gibbs ringing": sum("gibbs_kspace_kept" in s["artefacts"] for s in synth_stats),
           "N/2 ghost": sum("nyquist_ghost" in s["artefacts"] for s in synth_stats),
           "b0/b1000 motion": sum("b0_dwi_motion_vox" in s["artefacts"] for s in synth_stats)}  # fmt: skip
    masks_only = masks_only_components(args.real.parent / "masks-only")
    md = [
        "# Realism of the synthetic cases",
        "",
        "Generated by `scripts/realism_report.py` (seed "
        f"{args.seed}, {args.n} cases, `deepisles.synth.generate_case(case_rng(seed, i))`, the same cases "
        "`write_dataset(outdir, n, seed)` writes). Only derived figures and statistics of the real case are "
        "stored here; the real images stay in `shared/data`.",
        "",
        "## How a case is made",
        "",
        "- **Anatomy**: nilearn's MNI152 2009 T1/GM/WM maps (brain = T1 > 0.2 as in nilearn, CSF = brain - GM - WM)"
        " on a 1.5 mm grid, GM/WM boundary sharpened (an individual has less mixing than a 152-subject average).",
        "- **Subject**: head pose and size, smooth elastic warp (1.5-4 mm rms), central atrophy (larger ventricles)"
        ", atrophy that turns the template's faint sulci into CSF clefts, a 0-3 mm CSF rim kept by skull stripping"
        ", white-matter hyperintensities in some older subjects.",
        "- **Lesions** (template space): territorial wedges (MCA/ACA/PCA/cerebellar, cone from a deep apex), "
        "cortical, subcortical, lacunar, embolic, showers of 8-40 tiny emboli (0.01-0.4 mL) and main infarcts "
        "with up to 30 tiny satellites (the structure of real ISLES'22 masks: many components of a few voxels); "
        "exact volumes (0.01-200 mL, log-uniform), irregular "
        "borders from smoothed noise, territory borders from jittered MNI coordinates, tissue (never CSF) only.",
        "- **Contrast**: per compartment, S0 (b0) and S_b = S0 exp(-b ADC) with b = 1000; lesion ADC drop drawn "
        "per lesion from Beta(2.2, 3.5) on 8-60 % (mean ~27 %; rADC ~0.5-0.8 in the first day, rising later - "
        "Schlaug et al. 1997, Lansberg et al. 2001; the clinical core threshold ADC < 0.62, Purushotham et al. "
        "2015, is rADC ~0.7, so much of a DWI lesion is milder), "
        "T2 (S0) and FLAIR increase growing with time since onset (FLAIR-negative before ~4.5 h). "
        "T2 shine-through mimics (not lesions) in 35 % of cases: long-T2 tissue with normal or raised ADC.",
        "- **Acquisition**: random grid (1-2 mm in-plane, 2-5 mm slices, random axis order/flips, obliquity), "
        "box slice profile (sub-samples averaged), mild EPI distortion near the sinuses, EPI susceptibility "
        "pile-up and signal loss next to the frontal sinus/orbits and the petrous bone (often both sides; 75 % of "
        "cases), Gibbs ringing, N/2 ghosts and b0/b1000 motion on the scanner grid, coil bias, Rician noise "
        "on b0 and trace DWI, ADC computed from the noisy pair like a scanner. Expert-like mask: DWI voxels >= 50 % "
        "covered by infarcted tissue. FLAIR on its own grid (2D 0.7-1 x 4-6 mm or 3D ~1 mm) after a small head "
        "motion: not registered to the DWI.",
        "",
        "![real](realism_real.png)",
        "",
        "![synthetic](realism_synth.png)",
        "",
        "![gallery](realism_gallery.png)",
        "",
        "## DWI/ADC statistics",
        "",
        "Brain = voxels > 0 of the skull-stripped DWI; normal parenchyma = brain outside the lesion with "
        "0.1 < ADC < 1.5; lesion rows use the synthetic cases with a non-empty mask "
        f"({len(lesion_cases)} of {args.n}). ADC in 10^-3 mm^2/s.",
        "",
        table(real_stats, synth_stats),
        "",
        f"Scenarios drawn: {', '.join(f'{k} {v}' for k, v in sorted(scen.items()))}.",
        "",
        f"EPI artefacts drawn (cases of {args.n}): {', '.join(f'{k} {v}' for k, v in art.items())}.",
        "",
        *masks_only,
        f"Generation time per case (this machine, 1 process, FLAIR included, template already cached): "
        f"median {np.median(times):.2f} s, max {max(times):.2f} s wall; CPU median {np.median(cpu):.2f} s. "
        f"Loading and caching the template once per process: {t_template:.2f} s.",
        "",
        "## Reading the comparison",
        "",
        "- The real case is one elderly, atrophic brain with an embolic shower of ~30 tiny lesions at 2 mm "
        "isotropic; the synthetic set spans scanners, atrophy and lesion scenarios, so it should bracket rather "
        "than equal it.",
        "- Small lesions at thick slices carry partial volume (CSF, normal tissue) into the mask, exactly as in "
        "real data: the real mask's median ADC is only slightly below normal parenchyma. The synthetic "
        "ADC drop inside infarcted tissue is drawn per lesion (tests check it both in the noiseless model "
        "and in the written images).",
        "- Known simplifications: the anatomy is one template (warped), so gyral patterns repeat; FLAIR intensity "
        "scale is arbitrary (no real FLAIR to compare with here); no skull, only skull-stripped output; the "
        "artefacts are placed by MNI region, not simulated from a field map.",
        "",
        "## Calibration from dipy's real EPI b0",
        "",
        "The b0 noise level and CSF/brain b0 ratio of the model come from dipy's `S0_10slices.nii.gz`: "
        + (
            f"measured SNR {dipy['snr']:.1f}, CSF (99th pct) / median {dipy['csf_ratio']:.2f}; "
            if dipy
            else "dipy not installed here; "
        )
        + f"constants used: `DIPY_B0_SNR = {DIPY_B0_SNR}`, `DIPY_B0_CSF_RATIO = {DIPY_B0_CSF_RATIO}` "
        "(DWI SNR drawn from 0.7-1.5 x, CSF b0 from 4-5.5 x WM).",
        "",
    ]
    write_text_atomic(args.out / "realism.md", "\n".join(md))
    print(f"wrote {args.out / 'realism.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
