"""report.html: one self-contained page per case (numbers, members, warnings, preview, interactive viewer).

The page needs no network: the preview PNG and the volumes (gzipped NIfTI) are embedded as base64 and the
viewer, NiiVue (npm ``@niivue/niivue``, BSD-2-Clause, see ``vendor/niivue/README.md``), is inlined.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from deepisles.errors import OutputExistsError
from deepisles.io.image import Image
from deepisles.io.write import write_text_atomic

HTML_NAME = "report.html"
VENDOR_DIR = Path(__file__).parent / "vendor" / "niivue"
NIIVUE_BUNDLE = VENDOR_DIR / "niivue.umd.js"
NIIVUE_VERSION = "0.69.0"
# the page sets <html data-viewer="...">: "loading", then "ready" once NiiVue shows the volumes, else "error: ..."

# per-lesion columns shown first, in this order (labels); any other key follows under its own name
_LESION_COLUMNS = {
    "id": "#",
    "volume_ml": "volume (mL)",
    "voxels": "voxels",
    "centroid_mm": "centroid (RAS mm)",
    "max_extent_mm": "max extent (mm)",
    "mean_adc_1e-3_mm2_s": "mean ADC (10⁻³ mm²/s)",
    "min_adc_1e-3_mm2_s": "min ADC (10⁻³ mm²/s)",
    "hemisphere": "hemisphere",
    "lobes": "lobes",
    "regions": "regions",
    "agreement_mean": "mean agreement",
    "agreement_min": "min agreement",
}


@lru_cache(maxsize=1)
def niivue_bundle() -> str:
    """The vendored NiiVue UMD bundle (defines the global ``niivue``)."""
    text = NIIVUE_BUNDLE.read_text(encoding="utf-8")
    if "</script" in text.lower():  # would end the inline <script> early
        raise RuntimeError(f"{NIIVUE_BUNDLE}: contains '</script' and cannot be inlined")
    return text


@lru_cache(maxsize=1)
def _licences() -> str:
    return "\n\n".join(
        (VENDOR_DIR / name).read_text(encoding="utf-8") for name in ("LICENSE", "THIRD_PARTY_LICENSES.txt")
    )


def nifti_base64(img: Image, *, mask: bool = False, window: tuple[float, float] | None = None) -> str:
    """Base64 of a gzipped NIfTI-1 of ``img``: uint8 for a mask, else int16 with scl_slope (values kept to
    1/32767 of the largest magnitude, half the size of float32); ``window`` goes to cal_min/cal_max."""
    data = np.nan_to_num(np.asarray(img.data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if mask:
        nii = Image((data > 0).astype(np.uint8), img.affine).to_nifti()
    else:
        peak = float(np.abs(data).max())
        slope = peak / 32767.0 if peak > 0 else 1.0
        nii = Image(np.round(data / slope).astype(np.int16), img.affine).to_nifti()
        nii.header.set_slope_inter(slope, 0.0)
    if window is not None:
        nii.header["cal_min"], nii.header["cal_max"] = window
    raw = gzip.compress(nii.to_bytes(), compresslevel=6, mtime=0)
    return base64.b64encode(raw).decode("ascii")


def display_window(label: str, img: Image) -> tuple[float, float]:
    """Grey-level window as preview.png uses it: 1st-99.5th percentile of non-zero voxels; ADC from 0, at most 2."""
    vol = np.asarray(img.data, dtype=np.float32)
    nz = vol[np.isfinite(vol) & (vol != 0)]
    lo, hi = (float(v) for v in np.percentile(nz, [1, 99.5])) if nz.size else (0.0, 1.0)
    if label.upper() == "ADC":
        lo, hi = 0.0, (min(hi, 2.0) if hi > 0 else 1.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def focus_mm(mask: Image) -> list[float]:
    """World point (RAS mm) whose three planes hold the most lesion (the grid centre when there is none)."""
    m = np.asarray(mask.data) > 0
    if m.any():
        ijk = [int(np.argmax(m.sum(axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3)]
    else:
        ijk = [(s - 1) / 2 for s in m.shape[:3]]
    return [round(float(v), 2) for v in mask.affine[:3, :3] @ np.asarray(ijk, float) + mask.affine[:3, 3]]


# ---- formatting -------------------------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    """Compact, escaped text for any JSON value (report keys are read defensively)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _e(f"{value:.4g}") if abs(value) < 1e5 else _e(f"{value:.6g}")
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return "(" + ", ".join(_fmt(v) for v in value) + ")"
        return "; ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{_e(k)}: {_fmt(v)}" for k, v in value.items())
    return _e(value)


def _kv_table(d: dict, cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in d.items())
    return f'<table class="{cls}">{rows}</table>'


def _dict(d: object) -> dict:
    return d if isinstance(d, dict) else {}


def _get(d: object, *keys: str) -> object:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _lesion_table(rows: list) -> str:
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return "<p>No lesion found.</p>"
    keys = [k for k in _LESION_COLUMNS if any(k in r for r in rows)]
    keys += [k for r in rows for k in r if k not in keys and k not in _LESION_COLUMNS]
    keys = list(dict.fromkeys(keys))
    head = "".join(f"<th>{_e(_LESION_COLUMNS.get(k, k))}</th>" for k in keys)
    body = []
    for r in rows:
        c = r.get("centroid_mm")
        attr = f' data-mm="{_e(json.dumps(c))}" title="show in viewer"' if isinstance(c, list) and len(c) == 3 else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys) + "</tr>")
    return f'<table class="grid" id="lesion-table"><tr>{head}</tr>{"".join(body)}</table>'


def _members_html(members: object) -> tuple[str, list[str]]:
    """Members table and the weights notes to show prominently."""
    run = _get(members, "run") or []
    skipped = _get(members, "skipped") or []
    notes: list[str] = []
    rows = []
    for m in run if isinstance(run, list) else []:
        if not isinstance(m, dict):
            continue
        name = m.get("name", "?")
        w = m.get("weights")
        if isinstance(w, dict) and w.get("note"):
            notes.append(f"<b>{_e(name)}</b> ({_e(w.get('kind', 'weights'))}): {_e(w['note'])}")
        rows.append(
            f"<tr><td><b>{_e(name)}</b></td><td>ran</td><td>{_fmt(m.get('description'))}</td>"
            f"<td>{_fmt(w)}</td><td>{_fmt(m.get('lesion_volume_ml'))}</td></tr>"
        )
    for s in skipped if isinstance(skipped, list) else []:
        if isinstance(s, dict):
            rows.append(
                f"<tr class=\"skipped\"><td><b>{_e(s.get('member', '?'))}</b></td><td>skipped</td>"
                f"<td>{_fmt(s.get('reason'))}</td><td></td><td></td></tr>"
            )
    table = (
        '<table class="grid" id="members"><tr><th>member</th><th>status</th><th>description / reason</th>'
        "<th>weights</th><th>member lesion (mL)</th></tr>" + "".join(rows) + "</table>"
    )
    return table, notes


def _review_box(u: dict) -> str:
    """The "review recommended" flag with the reasons that fired and the rule (report.json ``uncertainty``)."""
    if not u:
        return ""
    flag = u.get("review_recommended")
    nets = _fmt(u.get("networks"))
    facts = (f"{_fmt(u.get('networks_total'))} networks ({nets}); disagreement volume "
             f"{_fmt(u.get('disagreement_volume_ml'))} mL; mean agreement in the lesion mask "
             f"{_fmt(u.get('mean_agreement_in_mask'))}")  # fmt: skip
    reasons = u.get("reasons") if isinstance(u.get("reasons"), list) else []
    if flag is True:
        head, cls = "Review recommended", "warn"
    elif flag is False:
        head, cls = "Networks agree: no review flag", "disclaimer"
    else:
        head, cls = f"Agreement not assessed: {_fmt(u.get('note'))}", "disclaimer"
    items = "".join(f"<li>{_e(r)}</li>" for r in reasons)
    return (f'<div class="box {cls}" id="review" data-review="{_e(str(flag).lower())}"><b>{_e(head)}</b>'
            f'{f"<ul>{items}</ul>" if items else ""}<div class="sub">{facts}</div>'
            f'<div class="sub">rule: {_fmt(u.get("rule"))}</div></div>')  # fmt: skip


def _section(title: str, body: str, sid: str, *, collapsed: bool = False) -> str:
    if collapsed:
        return f'<section id="{sid}"><details><summary><h2>{_e(title)}</h2></summary>{body}</details></section>'
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{body}</section>'


# ---- page -------------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f4f5f7;color:#1b1d21}
main{max-width:1180px;margin:0 auto;padding:12px 20px 40px}
h1{font-size:20px;margin:8px 0 2px}h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ccd}
.sub{color:#555;font-size:12px}.box{padding:8px 12px;border-radius:6px;margin:8px 0}
.note{background:#fff3cd;border:2px solid #e0a800}.warn{background:#fdecea;border:1px solid #e57373}
.disclaimer{background:#e8eaf0;border:1px solid #b0b6c6;font-size:12px}
.numbers{display:flex;gap:12px;flex-wrap:wrap}.num{background:#fff;border:1px solid #d5d8e0;border-radius:6px;
padding:8px 14px;min-width:120px}.num b{display:block;font-size:22px}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d5d8e0;padding:3px 7px;text-align:left;
vertical-align:top}table.kv th{background:#f0f1f4;font-weight:600}table.grid tr:first-child th{background:#e3e6ee}
#lesion-table tr[data-mm]{cursor:pointer}#lesion-table tr[data-mm]:hover{background:#ffe9e9}
tr.skipped{color:#777}#viewer-box{height:460px;background:#000;border-radius:6px;overflow:hidden}
#viewer-canvas{display:block;width:100%;height:100%}.controls{margin:6px 0;display:flex;gap:16px;flex-wrap:wrap;
align-items:center}#viewer-status{font-family:monospace;font-size:12px;color:#333;min-height:1.4em}
summary h2{display:inline-block;margin:10px 0 6px;border:0}summary{cursor:pointer}
img.preview{max-width:100%;background:#000;border-radius:6px}pre{white-space:pre-wrap;font-size:11px}
"""

_JS = """
(async () => {
  const root = document.documentElement, status = document.getElementById('viewer-status');
  const fail = (msg) => { root.setAttribute('data-viewer', 'error: ' + msg); status.textContent =
    'Interactive viewer unavailable (' + msg + '); the preview image below shows the same lesion.'; };
  try {
    if (typeof niivue === 'undefined') throw new Error('NiiVue bundle did not load');
    const cfg = JSON.parse(document.getElementById('viewer-config').textContent);
    const canvas = document.getElementById('viewer-canvas');
    if (!canvas.getContext('webgl2')) throw new Error('this browser has no WebGL2');
    const nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: false,
      dragAndDropEnabled: false, crosshairColor: [0.2, 0.8, 1, 0.8], multiplanarShowRender: 0 /* never */});
    nv.onLocationChange = (d) => {
      if (!d || !d.mm) return;
      const mm = Array.from(d.mm).slice(0, 3).map((v) => v.toFixed(1)).join(', ');
      const vals = (d.values || []).map((v) => v.name.replace(/[.]nii[.]gz$/, '') + ' ' +
        (Number.isFinite(v.value) ? String(+v.value.toPrecision(4)) : '-'));
      status.textContent = 'RAS (' + mm + ') mm · ' + vals.join(' · ');
    };
    await nv.attachToCanvas(canvas);
    nv.setSliceType(3);
    const b64 = (id) => document.getElementById(id).textContent.trim();
    const bases = {};
    for (const v of cfg.images) {
      bases[v.label] = await niivue.NVImage.loadFromBase64({base64: b64(v.id), name: v.label + '.nii.gz',
        colormap: 'gray', cal_min: v.window[0], cal_max: v.window[1]});
    }
    const mask = await niivue.NVImage.loadFromBase64({base64: b64(cfg.mask.id), name: 'lesion.nii.gz',
      colormap: 'red', opacity: cfg.mask.opacity, cal_min: 0.5, cal_max: 1});
    let base = bases[cfg.images[0].label];
    nv.addVolume(base);
    let agree = null;
    if (cfg.agreement) {  // share of the networks voting lesion: hidden until its box is ticked
      agree = await niivue.NVImage.loadFromBase64({base64: b64(cfg.agreement.id), name: 'agreement.nii.gz',
        colormap: 'warm', opacity: 0, cal_min: 0.01, cal_max: 1});
      nv.addVolume(agree);
    }
    nv.addVolume(mask);
    const goTo = (mm) => { nv.scene.crosshairPos = nv.mm2frac(mm); nv.drawScene(); nv.createOnLocationChange(); };
    goTo(cfg.focus_mm);
    document.getElementById('viewer-image').addEventListener('change', (ev) => {
      const next = bases[ev.target.value];
      if (next === base) return;
      nv.removeVolume(base); nv.addVolume(next); nv.setVolume(next, 0); base = next; nv.drawScene();
    });
    const opacity = document.getElementById('viewer-opacity'), show = document.getElementById('viewer-mask');
    const setMask = () => { nv.setOpacity(nv.volumes.indexOf(mask), show.checked ? opacity.value / 100 : 0); };
    opacity.addEventListener('input', setMask); show.addEventListener('change', setMask);
    const showAgree = document.getElementById('viewer-agreement');
    if (agree && showAgree) showAgree.addEventListener('change', () => {
      nv.setOpacity(nv.volumes.indexOf(agree), showAgree.checked ? 0.7 : 0); });
    document.getElementById('viewer-layout').addEventListener('change', (ev) => {
      nv.setSliceType(Number(ev.target.value)); });
    for (const tr of document.querySelectorAll('#lesion-table tr[data-mm]')) {
      tr.addEventListener('click', () => { goTo(JSON.parse(tr.dataset.mm)); canvas.scrollIntoView(); });
    }
    root.setAttribute('data-viewer', 'ready');
    root.setAttribute('data-viewer-volumes', String(nv.volumes.length));
    const r = canvas.getBoundingClientRect();
    root.setAttribute('data-canvas-rect', [r.left + scrollX, r.top + scrollY, r.width, r.height]
      .map(Math.round).join(','));
  } catch (err) { fail(err && err.message ? err.message : String(err)); }
})();
"""


def render_html(
    report: dict,
    *,
    dwi: Image,
    adc: Image,
    mask: Image,
    flair: Image | None = None,
    preview_png: Path | None = None,
    agreement: Image | None = None,
) -> str:
    """The report page as text (see write_html_report)."""
    report = _dict(report)
    lz = _dict(report.get("lesions"))
    inputs = _dict(report.get("inputs"))
    members_table, notes = _members_html(report.get("members"))
    warnings = report.get("warnings") if isinstance(report.get("warnings"), list) else []
    case = Path(str(_get(report, "inputs", "dwi", "path") or "case")).name
    tool = _dict(report.get("tool"))

    images = {"DWI": dwi, "ADC": adc, **({"FLAIR": flair} if flair is not None else {})}
    blocks, cfg_images = [], []
    for label, img in images.items():
        window = display_window(label, img)
        vid = f"vol-{label.lower()}"
        blocks.append(f'<script type="application/gzip;base64" id="{vid}">{nifti_base64(img, window=window)}</script>')
        cfg_images.append({"id": vid, "label": label, "window": [round(w, 4) for w in window]})
    blocks.append(f'<script type="application/gzip;base64" id="vol-mask">{nifti_base64(mask, mask=True)}</script>')
    config = {"images": cfg_images, "mask": {"id": "vol-mask", "opacity": 0.6}, "focus_mm": focus_mm(mask)}
    uncertainty = _dict(report.get("uncertainty"))
    if agreement is not None and (uncertainty.get("networks_total") or 0) >= 2:  # one network: nothing to show
        blocks.append(f'<script type="application/gzip;base64" id="vol-agreement">{nifti_base64(agreement)}</script>')
        config["agreement"] = {"id": "vol-agreement"}

    numbers = [("lesion volume", f"{_fmt(lz.get('volume_ml'))} mL"), ("lesions", _fmt(lz.get("count")))]
    for key, label in (("hemisphere", "hemisphere"), ("lobes", "lobes")):
        if lz.get(key) not in (None, "", [], {}):
            numbers.append((label, _fmt(lz[key])))
    numbers_html = "".join(f'<div class="num">{_e(k)}<b>{v}</b></div>' for k, v in numbers)
    summary = f'<div class="numbers">{numbers_html}</div>'
    extra = {k: lz[k] for k in ("voxels", "connectivity") if k in lz}
    if extra:
        summary += f'<p class="sub">{_fmt(extra)}</p>'
    mismatch = report.get("mismatch")
    if mismatch not in (None, {}, []):
        summary += "<h3>Mismatch</h3>" + (_kv_table(mismatch) if isinstance(mismatch, dict) else f"<p>{_fmt(mismatch)}</p>")

    layouts = [("3", "axial + coronal + sagittal"), ("0", "axial"), ("1", "coronal"), ("2", "sagittal"), ("4", "3D render")]
    viewer = (
        '<div class="controls"><label>image <select id="viewer-image">'
        + "".join(f'<option value="{lb}">{lb}</option>' for lb in images)
        + '</select></label><label><input type="checkbox" id="viewer-mask" checked> lesion mask (red)</label>'
        + ('<label><input type="checkbox" id="viewer-agreement"> network agreement (warm colours, 0-1)</label>'
           if "agreement" in config else "")
        + '<label>opacity <input type="range" id="viewer-opacity" min="0" max="100" value="60"></label>'
        '<label>layout <select id="viewer-layout">'
        + "".join(f'<option value="{v}">{t}</option>' for v, t in layouts)
        + "</select></label></div>"
        '<div id="viewer-box"><canvas id="viewer-canvas"></canvas></div>'
        '<div id="viewer-status">Loading the viewer… (needs JavaScript and WebGL2; no network)</div>'
        '<p class="sub">Click a row of the lesion table to move there; drag to move the crosshair, scroll to '
        "change slice.</p>"
    )

    parts = [
        f'<div class="box note"><b>Weights</b><ul>{"".join(f"<li>{n}</li>" for n in notes)}</ul></div>' if notes else "",
        ('<div class="box warn"><b>Warnings</b><ul>' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>")
        if warnings else "",
        _review_box(uncertainty),
        _section("Lesion", summary, "summary"),
        _section("Viewer", viewer, "viewer"),
    ]
    if preview_png is not None:
        png = base64.b64encode(Path(preview_png).read_bytes()).decode("ascii")
        parts.append(_section("Preview", f'<img class="preview" alt="preview" src="data:image/png;base64,{png}">',
                              "preview"))
    parts += [
        _section("Lesions", _lesion_table(lz.get("table") if isinstance(lz.get("table"), list) else []), "lesions"),
        _section("Ensemble members", members_table + f'<p class="sub">ensemble rule: {_fmt(_get(report, "ensemble", "rule"))}</p>', "members-section"),
        _section("Inputs", "".join(f"<h3>{_e(k)}</h3>{_kv_table(v)}" for k, v in inputs.items()
                                   if isinstance(v, dict)), "inputs", collapsed=True),
        _section("Preprocessing", _kv_table(_dict(report.get("preprocessing"))), "preprocessing", collapsed=True),
        _section("Run", _kv_table({k: report.get(k) for k in ("device", "fast_mode", "created", "timing_s")}), "run",
                 collapsed=True),
        '<section id="licences"><h2>Licences</h2><details><summary>The viewer is NiiVue '
        f"{NIIVUE_VERSION} (npm @niivue/niivue, BSD-2-Clause) with the components below.</summary>"
        f"<pre>{_e(_licences())}</pre></details></section>",
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\" data-viewer=\"loading\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>deepisles report: {_e(case)}</title><style>{_CSS}</style></head><body><main>"
        f"<h1>deepisles report: {_e(case)}</h1>"
        f'<div class="sub">deepisles {_e(tool.get("version", ""))} {_e(report.get("created", ""))}</div>'
        '<div class="box disclaimer">Research software. Not a medical device; not for clinical decisions.</div>'
        + "".join(parts)
        + "</main>"
        + "".join(blocks)
        + '<script type="application/json" id="viewer-config">'
        + json.dumps(config).replace("</", "<\\/")
        + "</script>\n"
        f"<script>/*! NiiVue {NIIVUE_VERSION} (npm @niivue/niivue, dist/niivue.umd.js) | BSD-2-Clause | "
        "Copyright (c) 2021, Niivue | bundled components and full licence texts: see the Licences section */\n"
        + niivue_bundle()
        + "\n</script>\n<script>"
        + _JS
        + "</script></body></html>\n"
    )


def write_html_report(
    outdir: Path,
    report: dict,
    *,
    dwi: Image,
    adc: Image,
    mask: Image,
    flair: Image | None = None,
    preview_png: Path | None = None,
    agreement: Image | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``outdir/report.html`` atomically and return its path.

    ``dwi``, ``adc``, ``flair`` and ``mask`` must share the DWI grid (as in ``segment``); ``preview_png`` is
    embedded when given, and ``agreement`` (the network agreement map) as a viewer overlay when the report counts
    two or more networks. An existing report.html is refused (OutputExistsError) unless ``overwrite``.
    """
    path = Path(outdir) / HTML_NAME
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it")
    text = render_html(report, dwi=dwi, adc=adc, mask=mask, flair=flair, preview_png=preview_png,
                       agreement=agreement)
    return write_text_atomic(path, text)


__all__ = ["HTML_NAME", "NIIVUE_VERSION", "render_html", "write_html_report", "nifti_base64"]
