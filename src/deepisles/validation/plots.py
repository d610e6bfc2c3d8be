"""Plots of the stratified evaluation: box plots per stratum and the Bland-Altman plot of the lesion volumes.

Drawn on a bare matplotlib ``Figure`` (Agg canvas; no pyplot state, no display) and written atomically as PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from deepisles.io.write import write_with_atomic

#: metric -> axis label of the box plots
BOX_METRICS = {"dice": "Dice", "lesion_f1": "lesion F1", "abs_volume_diff_ml": "|volume difference| (mL)"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)

    def _write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    return write_with_atomic(Path(path), _write)


def box_plots(path: Path, by: str, strata: dict[str, Sequence[dict]]) -> Path:
    """One panel per metric of :data:`BOX_METRICS`: a box (median, quartiles, 1.5 IQR whiskers) and the cases as
    points for each stratum holding cases, labelled with its n."""
    shown = {s: rows for s, rows in strata.items() if rows}
    labels = [f"{s}\n(n={len(rows)})" for s, rows in shown.items()]
    width = max(7.5, 1.1 * len(shown) * len(BOX_METRICS))
    fig = Figure(figsize=(width, 3.6), layout="constrained")
    rng = np.random.default_rng(0)  # point jitter only
    for ax, (metric, title) in zip(fig.subplots(1, len(BOX_METRICS)), BOX_METRICS.items(), strict=True):
        data = [np.array([float(r[metric]) for r in rows]) for rows in shown.values()]
        if data:
            ax.boxplot(data, showfliers=False, medianprops={"color": "tab:red"})
            ax.set_xticks(range(1, len(data) + 1), labels)
            for i, v in enumerate(data, start=1):
                ax.scatter(i + rng.uniform(-0.12, 0.12, v.size), v, s=10, alpha=0.6, color="tab:blue", zorder=3)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
        if metric != "abs_volume_diff_ml":
            ax.set_ylim(-0.05, 1.05)
    fig.suptitle(f"ISLES'22 metrics by {by}")
    return _save(fig, path)


def bland_altman_plot(path: Path, pred_ml: Sequence[float], ref_ml: Sequence[float], stats: dict) -> Path:
    """Difference (predicted - reference volume) against their mean, with the bias and 95 % limits of agreement
    of ``stats`` (:func:`deepisles.validation.strata.bland_altman`)."""
    p, r = np.asarray(pred_ml, float), np.asarray(ref_ml, float)
    fig = Figure(figsize=(5.5, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.scatter((p + r) / 2, p - r, s=14, alpha=0.7)
    lines = (("bias_ml", "-", "bias"), ("loa_high_ml", "--", "+1.96 SD"), ("loa_low_ml", "--", "-1.96 SD"))
    for key, style, name in lines:
        value = stats.get(key)
        if value is not None and np.isfinite(value):
            ax.axhline(value, linestyle=style, color="tab:red" if key == "bias_ml" else "grey", linewidth=1)
            ax.annotate(f"{name} {value:.2f}", xy=(1.0, value), xycoords=("axes fraction", "data"), ha="right",
                        va="bottom", fontsize=8)  # fmt: skip
    ax.set_xlabel("mean of predicted and reference volume (mL)")
    ax.set_ylabel("predicted - reference volume (mL)")
    ax.set_title(f"Bland-Altman, {stats.get('n', p.size)} case(s)")
    return _save(fig, path)
