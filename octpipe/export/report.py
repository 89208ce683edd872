"""Self-contained HTML: the per-volume report and the screening index of an export folder.

Pictures are embedded as base64 PNG data, so a report is one file that opens anywhere (mail,
PACS attachment, offline laptop). Nothing in it comes from the source file's header except
laterality and geometry: no names, dates of birth or device serials.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from PIL import Image

from octpipe import __version__
from octpipe.export.figures import RESEARCH_ONLY, VMAX_Z

__all__ = ["write_volume_report", "write_index_html"]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1d1d1f;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.ruo{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px;margin:10px 0;font-weight:600}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left}
.kpi{display:inline-block;margin:4px 18px 4px 0} .kpi b{font-size:20px;display:block}
img{max-width:100%} .grid{display:grid;grid-template-columns:1fr 1fr;gap:10px}
pre{background:#f7f7f7;padding:8px;font-size:12px;white-space:pre-wrap;max-height:320px;overflow:auto}
.flag{color:#a00;font-weight:600}
"""


def _data_uri(path: Path, max_width: int | None = None) -> str:
    im = Image.open(path).convert("RGB")
    if max_width is not None and im.width > max_width:
        im = im.resize((max_width, round(im.height * max_width / im.width)), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n{body}\n<p style=\"color:#777;font-size:12px\">octpipe "
            f"{html.escape(__version__)} - {html.escape(RESEARCH_ONLY)}</p></body></html>\n")


def _reference(rows: list[dict[str, Any]]) -> str:
    """What the index's percentiles are relative to (one reference, or "each volume's reference")."""
    refs = {str(s.get("volume_percentile_reference", "normal patches")) for s in rows if s.get("calibrated")}
    if not refs:
        return "nothing (the model is not calibrated)"
    return refs.pop() if len(refs) == 1 else "each volume's reference (see its report)"


def write_volume_report(path: str | Path, summary: dict[str, Any], model: dict[str, Any], folder: str | Path) -> Path:
    """The report of one volume (``report.html`` beside its pictures, which it embeds)."""
    folder = Path(folder)
    vid = html.escape(str(summary["volume_id"]))
    calibrated = summary.get("calibrated")
    kpis = [("volume score (p99 window A)", _fmt(summary["volume_score"], 4))]
    if calibrated:
        reference = summary.get("volume_percentile_reference", "normal patches")
        kpis += [(f"percentile among {reference}", f"{summary['volume_percentile']:.1f}"),
                 ("windows above normal p99", f"{100 * summary['anomalous_window_fraction']:.1f} % (healthy ~1 %)"),
                 (f"retina voxels with residual >= {summary['threshold_z']:g}x normal",
                  f"{100 * summary['anomalous_voxel_fraction']:.2f} %")]
    kpi_html = "".join(f"<span class=\"kpi\"><b>{v}</b>{html.escape(k)}</span>" for k, v in kpis)
    flags = summary.get("qc_flags") or []
    qc = ("<p class=\"flag\">QC: " + html.escape(", ".join(flags)) + "</p>") if flags else "<p>QC: no flags.</p>"
    if not calibrated:
        qc += "<p class=\"flag\">The model has no calibration: maps are in raw residual units.</p>"
    fovea = summary.get("fovea", {})
    sector_rows = "".join(
        f"<tr><td class=\"l\">{html.escape(r['sector'])}</td><td>{_fmt(r['mean'])}</td><td>{_fmt(r['max'])}</td>"
        f"<td>{r['covered_mm2']:.2f}</td><td>{100 * r['covered_fraction']:.0f} %</td></tr>"
        for r in summary.get("sectors", []))
    bscans = []
    for i in summary.get("most_anomalous_bscans", []):
        p = folder / "overlays" / f"bscan_{i:03d}.png"
        if p.is_file():
            bscans.append(f"<figure><img src=\"{_data_uri(p)}\" alt=\"B-scan {i + 1}\"><figcaption>B-scan {i + 1}"
                          f"</figcaption></figure>")
    enface = "".join(f"<img src=\"{_data_uri(folder / n)}\" alt=\"{n}\">" for n in ("enface.png", "enface-max.png")
                     if (folder / n).is_file())
    notes = [summary.get(k) for k in ("geometry_note", "enface_note") if summary.get(k)]
    notes += list(summary.get("preprocessing_notes") or [])
    notes_html = "".join(f"<p class=\"flag\">{html.escape(str(n))}</p>" for n in notes)
    if summary.get("enface_note"):
        enface_html = ""
    else:
        enface_html = f"""<h2>En-face anomaly (ETDRS grid on the fovea)</h2>
<p>Mean (left) and maximum (right) anomaly over depth inside ILM..BM, superior up, in units of the normal RMS
residual (1 = a typical healthy residual). Grid centre: B-scan {_fmt(fovea.get('bscan'))}, A-scan
{_fmt(fovea.get('ascan'))} ({_fmt(fovea.get('method'))}).</p>
<div class="grid">{enface}</div>
<h2>ETDRS sectors (mean anomaly over depth)</h2>
<table><tr><th class="l">sector</th><th>mean</th><th>max</th><th>covered mm&sup2;</th><th>covered</th></tr>
{sector_rows}</table>"""
    card = model.get("card")
    card_html = f"<pre>{html.escape(card)}</pre>" if card else "<p>No model card.</p>"
    model_rows = "".join(f"<tr><th class=\"l\">{html.escape(k)}</th><td class=\"l\">{_fmt(v)}</td></tr>"
                         for k, v in model.items() if k not in ("card", "path"))
    body = f"""
<h1>OCT anomaly report - volume {vid}</h1>
<div class="ruo">{html.escape(RESEARCH_ONLY)}. Anomaly maps from an unsupervised f-AnoGAN model highlight
tissue that differs from the healthy training data; they are not a diagnosis.</div>
<p>Eye: <b>{_fmt(summary.get('laterality'))}</b> - B-scan order: {_fmt(summary.get('bscan_order'))} -
source format: {_fmt(summary.get('source_format'))} - windows scored: {summary['n_windows']}</p>
<h2>Summary</h2>{kpi_html}{qc}{notes_html}
{enface_html}
<h2>Most anomalous B-scans</h2>
<p>Colour: residual from 1 (transparent) to {VMAX_Z:g} times the normal RMS residual; green line ILM, blue line
BM.</p>
<div class="grid">{''.join(bscans)}</div>
<h2>Model</h2><table>{model_rows}</table>
{card_html}
"""
    out = Path(path)
    out.write_text(_page(f"octpipe report {summary['volume_id']}", body), encoding="utf-8")
    return out


def write_index_html(path: str | Path, rows: list[dict[str, Any]], *, failed: dict[str, str] | None = None) -> Path:
    """The screening index: every exported volume ranked by volume score, with links to reports.

    Volumes in ``failed`` (volume id to the one-line reason) are listed after them, status failed.
    """
    out = Path(path)
    folder = out.parent
    lines = []
    for rank, s in enumerate(rows, 1):
        vid = str(s["volume_id"])
        thumb_path = folder / vid / "enface.png"
        thumb = (f"<img src=\"{_data_uri(thumb_path, 160)}\" alt=\"en-face\">" if thumb_path.is_file() else "")
        pct = s.get("volume_percentile")
        frac = s.get("anomalous_window_fraction")
        flags = ", ".join(s.get("qc_flags") or [])
        lines.append(
            f"<tr><td>{rank}</td><td class=\"l\"><a href=\"{html.escape(vid)}/report.html\">{html.escape(vid)}</a>"
            f"</td><td>{s['volume_score']:.4g}</td><td>{'' if pct is None else f'{pct:.1f}'}</td>"
            f"<td>{'' if frac is None else f'{100 * frac:.1f} %'}</td><td>{_fmt(s.get('laterality'))}</td>"
            f"<td class=\"l flag\">{html.escape(flags)}</td><td>{thumb}</td></tr>")
    failed_html = ""
    if failed:
        items = "".join(f"<tr><td class=\"l\">{html.escape(vid)}</td><td class=\"l\">failed</td>"
                        f"<td class=\"l flag\">{html.escape(reason)}</td></tr>" for vid, reason in failed.items())
        failed_html = (f"<h2>Failed ({len(failed)})</h2>\n<table><tr><th class=\"l\">volume</th><th class=\"l\">"
                       f"status</th><th class=\"l\">reason</th></tr>\n{items}</table>")
    body = f"""
<h1>octpipe screening index</h1>
<div class="ruo">{html.escape(RESEARCH_ONLY)}.</div>
<p>{len(rows)} volumes ranked by volume score (99th percentile of the window anomaly score A), most anomalous
first. Percentile: of the volume score among {html.escape(_reference(rows))} (a model calibrated on normal volumes
with <code>octpipe calibrate</code> ranks a healthy volume near the middle; among normal patches a healthy
volume sits near 99 by construction). Windows above normal p99: about 1 % for a healthy volume.</p>
<table><tr><th>rank</th><th class="l">volume</th><th>volume score</th><th>percentile</th>
<th>windows above normal p99</th><th>eye</th><th class="l">QC flags</th><th>en-face</th></tr>
{''.join(lines)}</table>
{failed_html}"""
    out.write_text(_page("octpipe screening index", body), encoding="utf-8")
    return out
