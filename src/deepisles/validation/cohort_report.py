"""Pictures and the self-contained HTML page of ``deepisles cohort`` (matplotlib Agg; images inlined as base64,
no scripts, no network)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from deepisles.io.write import write_text_atomic, write_with_atomic  # noqa: E402
from deepisles.validation.cohort_mni import map_grid, template_on_grid  # noqa: E402

MONTAGE_SLICES = 12


def _save(fig, path: Path) -> Path:
    write_with_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def frequency_png(freq: np.ndarray, n: int, path: Path) -> Path:
    """Axial montage of the frequency map over the MNI152 T1 (left of the picture = subject's left)."""
    t1 = template_on_grid()
    brain_z = np.flatnonzero((t1 > 0.2).any(axis=(0, 1)))
    zs = np.linspace(brain_z[0] + 4, brain_z[-1] - 4, MONTAGE_SLICES).round().astype(int)
    vmax = max(float(freq.max()), 1e-6)
    _, grid = map_grid()
    cols = 6
    rows = int(np.ceil(len(zs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.3 + 0.4), facecolor="black")
    im = None
    for ax, z in zip(np.ravel(axes), zs, strict=False):
        ax.imshow(t1[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        f = np.ma.masked_less_equal(freq[:, :, z].T, 0)
        im = ax.imshow(f, cmap="hot", origin="lower", vmin=0, vmax=vmax, alpha=0.9)
        ax.set_title(f"z = {grid[2, 2] * z + grid[2, 3]:.0f} mm", color="white", fontsize=8)
        ax.axis("off")
    for ax in np.ravel(axes)[len(zs):]:
        ax.axis("off")
    fig.suptitle(f"Lesion frequency, MNI152 (n = {n}); left of each image = left hemisphere", color="white",
                 fontsize=10)  # fmt: skip
    if im is not None:
        cb = fig.colorbar(im, ax=np.ravel(axes).tolist(), fraction=0.02, pad=0.01)
        cb.set_label("share of subjects with a lesion", color="white")
        cb.ax.yaxis.set_tick_params(color="white", labelcolor="white")
    return _save(fig, path)


def _fmt_rho(row: dict | None) -> str:
    if not row or row.get("rho") is None:
        return "n/a"
    return f"ρ={row['rho']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}], n={row['n']}"


def scatter_png(subjects, score: str, label: str, stats_rows: list[dict], path: Path) -> Path:
    """Lesion volume and count against one score; predicted (and expert) with their rho and CI in the legend."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, (what, pred_attr, exp_attr, xlabel) in zip(axes, (
        ("volume_ml", "volume_ml", "expert_volume_ml", "lesion volume (mL, symlog)"),
        ("count", "count", "expert_count", "lesion count"),
    ), strict=True):  # fmt: skip
        for source, attr, colour, marker in (("predicted", pred_attr, "tab:blue", "o"),
                                             ("expert", exp_attr, "tab:orange", "s")):  # fmt: skip
            pts = [(getattr(s, attr), s.scores[score]) for s in subjects
                   if getattr(s, attr) is not None and s.scores.get(score) is not None]  # fmt: skip
            if not pts:
                continue
            row = next((r for r in stats_rows if r["score"] == score and r["source"] == source
                        and r["biomarker"] == what), None)  # fmt: skip
            x, y = np.array(pts, float).T
            ax.scatter(x, y, s=18, c=colour, marker=marker, alpha=0.7, label=f"{source}: {_fmt_rho(row)}")
        if what == "volume_ml":
            ax.set_xscale("symlog", linthresh=1.0)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{label}: Spearman ρ with 95 % bootstrap CI", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list[dict], cols: list[str]) -> str:
    def cell(v) -> str:
        if v is None:
            return ""
        return html.escape(f"{v:.3g}" if isinstance(v, float) else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:70em;color:#222}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px}
th{background:#eee}img{max-width:100%}.note{color:#555;font-size:0.9em}"""


def write_figures_and_html(result, freq: np.ndarray, summary: dict) -> None:
    """Scatter plots (one PNG per score), the frequency montage and the HTML page; adds them to ``result.files``."""
    from deepisles.validation.cohort import DIFF_COLUMNS, EXCL_COLUMNS, SCORES, STAT_COLUMNS

    files = result.files
    frequency_png(freq, result.map_n, files["frequency_png"])
    scatters = []
    for score in result.score_columns:
        path = result.outdir / f"scatter_{score}.png"
        scatter_png(result.subjects, score, SCORES[score][0], result.statistics, path)
        files[f"scatter_{score}"] = path
        scatters.append((score, path))
    inputs = summary["inputs"]
    cols = ", ".join(f"{v['label']}: column <code>{html.escape(v['column'])}</code>"
                     for v in summary["score_columns"].values())  # fmt: skip
    s = summary["settings"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>deepisles cohort statistics</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Lesion biomarkers vs clinical scores</h1>",
        f"<p>Batch output <code>{html.escape(inputs['batch_output'])}</code>, participants "
        f"<code>{html.escape(inputs['participants'])}</code>"
        + (f", reference masks <code>{html.escape(inputs['reference'])}</code>" if inputs["reference"] else "")
        + f". {cols}. {summary['subjects']['analysed']} subjects analysed "
        f"({summary['subjects']['no_lesion']} without a predicted lesion), {len(result.exclusions)} exclusion rows."
        "</p>",
        f"<p class='note'>Spearman ρ (scipy.stats.spearmanr, its p-value uncorrected for the number of tests); "
        f"95 % CI: {html.escape(s['ci'])}, {s['bootstrap']} resamples, seed {s['seed']}; no correlation below "
        f"{s['min_n']} subjects. Research use: deepisles {html.escape(summary['tool']['version'])}.</p>",
        "<h2>Correlations</h2>",
        _table(result.statistics, STAT_COLUMNS),
    ]
    if result.differences:
        parts += ["<h2>Predicted vs expert: difference of the two dependent correlations</h2>",
                  f"<p class='note'>{html.escape(s['difference_test'])} (subjects with both masks and the score); "
                  "p_boot = 2 × the smaller share of resampled differences on either side of 0.</p>",
                  _table(result.differences, DIFF_COLUMNS)]  # fmt: skip
    for score, path in scatters:
        parts += [f"<h2>Scatter: {html.escape(SCORES[score][0])}</h2>", _img(path, f"scatter {score}")]
    parts += ["<h2>Lesion frequency map (MNI152 2009a, 2 mm)</h2>",
              f"<p class='note'>{result.map_n} subjects; {html.escape(s['frequency_map'])}. NIfTI: "
              f"<code>{files['frequency_nifti'].name}</code>.</p>",
              _img(files["frequency_png"], "lesion frequency map"),
              "<h2>Exclusions</h2>",
              _table(result.exclusions, EXCL_COLUMNS) if result.exclusions else "<p>none</p>",
              "</body></html>"]  # fmt: skip
    write_text_atomic(files["html"], "\n".join(parts) + "\n")
