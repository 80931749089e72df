"""The run report: OUT/RUN/report.html, one self-contained file (thumbnails inline as data
URIs, no scripts or fonts fetched) that tells a run's story at a glance:

1. key figures: inputs, variants, pass rate, rejected, errors, retries, throughput and
   worker / GPU seconds per variant;
2. per recipe: counts, pass rate, attempts;
3. histograms of the main scores (inline SVG);
4. marketplace compliance per channel and recipe, and the most failed rules;
5. errors grouped by stage and error type, with an example each;
6. a contact sheet per SKU: source, every variant attempt, key scores, pass/fail reasons
   (SKUs with rejections or errors first; capped so the file stays small).

Elements carrying figures have stable ids (`kpi-<name>`) and data attributes so tests and
scripts can read them from the DOM.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ops.compliance import channels
from pipelines.report_figures import HISTOGRAM_SCORES, REVIEW_ROWS, SHEET_SCORES, Histogram, RunFigures, gather
from pipelines.sources import DEFAULT_MAX_SOURCE_MB, DEFAULT_SOURCE_TIMEOUT_S, SourcePolicy
from pipelines.storage import StorageConfig, StorageError, join, read_bytes, write_bytes

log = logging.getLogger(__name__)

REPORT = "report.html"


def write_report(run_prefix: str, storage: StorageConfig, max_skus: int = 60, thumb_px: int = 144) -> str:
    """Render OUT/RUN/report.html; returns its URI. The figures come from streaming scans of
    the run's tables (pipelines/report_figures.py): memory does not grow with the catalog."""
    figures = gather(run_prefix, storage, max_skus=max_skus)
    page = render(figures, storage, thumb_px=thumb_px)
    uri = join(run_prefix, REPORT)
    write_bytes(uri, page.encode("utf-8"), storage, "text/html; charset=utf-8")
    return uri


def _fmt(v, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}"


# ------------------------------------------------------------------------------ sections


def render(fig: RunFigures, storage: StorageConfig, thumb_px: int = 144) -> str:
    rec, k = fig.record, fig.key
    kpis = [
        ("inputs", "inputs", ""), ("variants", "variants", ""), ("pass_rate", "pass rate", "pct"), ("passed", "passed", ""),
        ("rejected", "rejected", ""), ("errors", "error rows", ""), ("retries", "gate retries", ""), ("reused", "reused", ""),
        ("throughput", "images / s", ""), ("worker_s_per_variant", "worker s / variant", ""), ("gpu_s_per_variant", "GPU s / variant (bound)", ""),
    ]  # fmt: skip
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>skustudio run {e(str(rec.get('run_id')))}</title><style>{CSS}</style></head><body>",
        f"<h1>Run <span id='run-id'>{e(str(rec.get('run_id')))}</span></h1>",
        f"<p class='meta'>committed {e(str(rec.get('created_utc', '')))} · attempt {e(str(rec.get('attempt', 1)))} · "
        f"execution {_fmt(k['execute_s'])} s · reused from {e(str(rec.get('reused_from_run') or '–'))}</p>",
        "<section class='kpis'>",
        *[f"<div class='kpi' data-kpi='{name}'><span class='v' id='kpi-{name}'>{_fmt(k[name], kind)}</span><span class='l'>{label}</span></div>" for name, label, kind in kpis],
        "</section>",
        _recipes_section(fig),
        _cost_section(fig),
        _histograms_section(fig),
        _compliance_section(fig),
        _errors_section(fig),
        _review_section(fig),
        _sheets_section(fig, storage, thumb_px),
        # The only script: after load, record how many thumbnails the browser decoded (so a
        # headless check can tell a broken image from a good one). Nothing is fetched.
        "<script>addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.images=i.length;document.body.dataset.imagesDecoded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _cost_section(fig: RunFigures) -> str:
    if not fig.cost:
        return ""
    total = sum(fig.cost.values())
    rows = "".join(
        f"<tr data-op='{html.escape(op)}'><td>{html.escape(op)}</td><td class='n' data-col='seconds'>{s:.3f}</td><td class='n' data-col='share'>{s / total:.0%}</td></tr>"
        for op, s in fig.cost.items()
    )
    per_hour = 3600.0 / total if total else float("nan")
    return (
        f"<h2>Cost</h2><p>Worker-seconds per generated variant: <b id='cost-per-variant'>{total:.2f}</b> "
        f"(<span id='variants-per-cpu-hour'>{per_hour:,.0f}</span> variants per CPU-hour), by op:</p>"
        f"<table id='cost'><tr><th>op</th><th>s / variant</th><th>share</th></tr>{rows}</table>"
    )


def _recipes_section(fig: RunFigures) -> str:
    rows = []
    for name, r in fig.recipes.items():
        rate = r.passed / r.variants if r.variants else None
        rows.append(
            f"<tr data-recipe='{html.escape(name)}'><td>{html.escape(name)}</td><td class='n' data-col='variants'>{r.variants}</td>"
            f"<td class='n' data-col='passed'>{r.passed}</td><td class='n' data-col='pass-rate'>{_fmt(rate, 'pct')}</td>"
            f"<td class='n' data-col='attempts'>{r.attempts}</td><td class='n' data-col='errors'>{r.errors}</td></tr>"
        )
    return ("<h2>Recipes</h2><table id='recipes'><tr><th>recipe</th><th>variants</th><th>passed</th><th>pass rate</th>"
            "<th>attempts</th><th>errors</th></tr>" + "".join(rows) + "</table>")  # fmt: skip


def histogram_svg(hist: Histogram, width: int = 320, height: int = 110) -> str:
    """A small bar histogram as inline SVG, with the range printed under it."""
    counts, bins = hist.counts, len(hist.counts)
    top = counts.max() or 1
    bw = width / bins
    bars = "".join(
        f"<rect x='{i * bw + 1:.1f}' y='{height - 14 - (c / top) * (height - 20):.1f}' width='{bw - 2:.1f}' height='{(c / top) * (height - 20):.1f}'><title>{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (f"<svg width='{width}' height='{height}' role='img' data-n='{hist.n}'>{bars}"
            f"<text x='0' y='{height - 2}'>{hist.lo:.3g}</text><text x='{width}' y='{height - 2}' text-anchor='end'>{hist.hi:.3g}</text></svg>")  # fmt: skip


def _histograms_section(fig: RunFigures) -> str:
    cells = [
        f"<figure data-score='{col}'>{histogram_svg(fig.histograms[col])}<figcaption>{html.escape(label)}</figcaption></figure>"
        for col, label in HISTOGRAM_SCORES
        if col in fig.histograms
    ]
    return "<h2>Scores</h2><div class='hists'>" + ("".join(cells) or "<p class='muted'>no scores</p>") + "</div>"


def _compliance_section(fig: RunFigures) -> str:
    chans = channels()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in chans)
    rows = []
    for name, r in fig.recipes.items():
        if not r.variants:
            continue
        cells = "".join(f"<td class='n' data-channel='{ch}' data-pass='{r.compliance.get(ch, 0)}' data-total='{r.variants}'>{r.compliance.get(ch, 0)}/{r.variants}</td>" for ch in chans)
        rows.append(f"<tr data-recipe='{html.escape(name)}'><td>{html.escape(name)}</td>{cells}</tr>")
    required = {(ch, rule.name): rule.required for ch, spec in chans.items() for rule in spec.rules}
    top = "".join(
        f"<li data-rule='{ch}_{rule}'>{html.escape(ch)} · {html.escape(rule)}{'' if required[(ch, rule)] else ' (recommended)'}: <b>{n}</b></li>"
        for ch, rule, n in fig.failed_rules[:12]
    )
    return (f"<h2>Marketplace compliance</h2><table id='compliance'><tr><th>recipe</th>{head}</tr>{''.join(rows)}</table>"
            f"<h3>Most failed rules</h3><ul id='failed-rules'>{top or '<li>none</li>'}</ul>")  # fmt: skip


def _errors_section(fig: RunFigures) -> str:
    if not fig.error_groups:
        return "<h2>Errors</h2><p id='no-errors'>No error rows.</p>"
    rows = []
    for g in fig.error_groups:
        msg = (g.example.get("message") or "")[:240]
        rows.append(
            f"<tr data-stage='{html.escape(g.stage)}' data-error-type='{html.escape(g.error_type)}'><td>{html.escape(g.stage)}</td><td>{html.escape(g.error_type)}</td>"
            f"<td class='n' data-col='count'>{g.rows}</td><td>{html.escape(str(g.example.get('sku')))}: {html.escape(msg)}</td></tr>"
        )
    return "<h2>Errors</h2><table id='errors'><tr><th>stage</th><th>error type</th><th>rows</th><th>example</th></tr>" + "".join(rows) + "</table>"


def _review_section(fig: RunFigures) -> str:
    """Variants whose gate failed on the product mask's confidence: the segmentation model was
    unsure what the product is, so a person should look (the image is under rejected/)."""
    if not fig.key["variants"]:
        return ""
    if not fig.review_total:
        return "<h2>Cutouts to review</h2><p id='no-review'>No variant was rejected for a doubtful product mask.</p>"
    rows = [
        f"<tr data-sku='{html.escape(r['sku'])}' data-recipe='{html.escape(r['recipe'])}'><td>{html.escape(r['sku'])}</td><td>{html.escape(r['recipe'])}</td>"
        f"<td class='n'>{r['variant']}</td><td class='n'>{_fmt(r['score_mask_confidence'])}</td><td>{html.escape(r['output_uri'] or '')}</td></tr>"
        for r in fig.review
    ]
    more = f"<p class='muted'>{fig.review_total - REVIEW_ROWS} more (filter variants/*.parquet on score_mask_confidence).</p>" if fig.review_total > REVIEW_ROWS else ""
    return (
        f"<h2>Cutouts to review</h2><p class='muted'>{fig.review_total} variants rejected because the product mask is doubtful; "
        "their images are under rejected/.</p><table id='review'><tr><th>sku</th><th>recipe</th><th>variant</th><th>mask confidence</th><th>image</th></tr>"
        + "".join(rows) + "</table>" + more
    )


def thumbnail(uri: str, storage: StorageConfig, px: int, sources: SourcePolicy | None = None) -> str:
    """A data-URI JPEG thumbnail of an image object, or '' when it cannot be read. A manifest's
    source is read only through the run's source policy (the report is published: it must
    not show what the run refused to read)."""
    try:
        data = sources.read(uri, storage).data if sources is not None else read_bytes(uri, storage)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (px, px))  # JPEG: decode at reduced size
            if im.mode in ("RGBA", "LA") or "transparency" in im.info:
                # A cutout: show it on light grey, as editors do, not on black.
                im = Image.alpha_composite(Image.new("RGBA", im.size, (225, 225, 225, 255)), im.convert("RGBA"))
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
    except (StorageError, OSError, ValueError) as exc:
        log.info("report: no thumbnail for %s: %s", uri, exc)
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f"<img src='{src}' alt='{html.escape(alt)}'>" if src else f"<div class='noimg'>{html.escape(alt)}: unavailable</div>"


def source_policy_of(record: dict) -> SourcePolicy:
    """The source policy the run used, rebuilt from its _run.json config."""
    cfg = record.get("config", {})
    return SourcePolicy.for_manifest(
        cfg.get("manifest") or "", tuple(cfg.get("source_prefixes") or ()),
        max_source_mb=cfg.get("max_source_mb") or DEFAULT_MAX_SOURCE_MB, timeout_s=cfg.get("source_timeout_s") or DEFAULT_SOURCE_TIMEOUT_S,
    )  # fmt: skip


def _sheets_section(fig: RunFigures, storage: StorageConfig, thumb_px: int) -> str:
    sh = fig.sheets
    sources = {sku: (sh.variants_of.get(sku) or sh.errors_of.get(sku) or [{}])[0].get("source_uri") for sku in sh.shown}
    policy = source_policy_of(fig.record)
    # Thumbnails are many small reads (S3 GETs): fetch them concurrently. A source the run
    # refused (not allowed, too large, too slow) is not read for a thumbnail.
    src_uris = {u for u in sources.values() if u and u not in sh.refused_sources}
    out_uris = {r["output_uri"] for sku in sh.shown for r in sh.variants_of.get(sku, []) if r.get("output_uri")}
    with ThreadPoolExecutor(max_workers=16) as pool:
        thumbs = dict(zip(src_uris, pool.map(lambda u: thumbnail(u, storage, thumb_px, policy), src_uris)))
        thumbs.update(zip(out_uris, pool.map(lambda u: thumbnail(u, storage, thumb_px), out_uris)))
    cards = []
    for sku in sh.shown:
        rows = sorted(sh.variants_of.get(sku, []), key=lambda r: (r["recipe"], r["variant"], r.get("attempt") or 1))
        src_uri = sources[sku]
        tiles = [f"<div class='tile src'>{_img(thumbs.get(src_uri, '') if src_uri else '', 'source')}<div class='cap'>source</div></div>"]
        for r in rows:
            scores = " · ".join(f"{short} {_fmt(r.get(col))}" for col, short in SHEET_SCORES if r.get(col) is not None and math.isfinite(r.get(col)))
            why = "; ".join(r.get("reasons") or [])
            status = "pass" if r["passed"] else "fail"
            tiles.append(
                f"<div class='tile {status}' data-recipe='{html.escape(r['recipe'])}' data-variant='{r['variant']}' data-attempt='{r.get('attempt') or 1}' data-passed='{str(bool(r['passed'])).lower()}'>"
                f"{_img(thumbs.get(r['output_uri'], ''), r['recipe'])}"
                f"<div class='cap'><b>{html.escape(r['recipe'])}</b> v{r['variant']}{' a' + str(r.get('attempt')) if (r.get('attempt') or 1) > 1 else ''} "
                f"<span class='badge'>{status}</span><br>{html.escape(scores)}{'<br><span class=why>' + html.escape(why) + '</span>' if why else ''}</div></div>"
            )
        for er in sh.errors_of.get(sku, []):
            tiles.append(f"<div class='tile err'><div class='cap'><b>error</b> {html.escape(er.get('stage') or '')}: {html.escape((er.get('message') or '')[:160])}</div></div>")
        cards.append(f"<div class='sku' data-sku='{html.escape(sku)}'><h3>{html.escape(sku)}</h3><div class='tiles'>{''.join(tiles)}</div></div>")
    more = f"<p class='muted' id='sheets-more'>{sh.total_skus - len(sh.shown)} more SKUs not shown (see variants/*.parquet).</p>" if sh.total_skus > len(sh.shown) else ""
    return f"<h2>Contact sheets</h2><div id='sheets' data-shown='{len(sh.shown)}' data-total='{sh.total_skus}'>{''.join(cards)}</div>{more}"


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin:0 0 4px}h2{margin-top:28px;border-bottom:1px solid #ddd}
.meta,.muted{color:#777}
.kpis{display:flex;flex-wrap:wrap;gap:10px}
.kpi{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:110px}
.kpi .v{display:block;font-size:22px;font-weight:600}.kpi .l{color:#666;font-size:12px}
table{border-collapse:collapse}td,th{border:1px solid #e3e3e3;padding:4px 8px;text-align:left}td.n{text-align:right}
.hists{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}svg rect{fill:#4a7bd0}svg text{font-size:10px;fill:#555}
.tiles{display:flex;flex-wrap:wrap;gap:8px}.tile{width:150px;border:2px solid #ccc;border-radius:4px;padding:3px;font-size:11px}
.tile img{width:144px;height:144px;object-fit:contain;background:#f4f4f4}
.tile.pass{border-color:#3a9d5d}.tile.fail{border-color:#d04a4a}.tile.err{border-color:#d08a2a;background:#fff6e8}
.badge{font-weight:600}.pass .badge{color:#3a9d5d}.fail .badge{color:#d04a4a}.why{color:#a33}
.noimg{width:144px;height:144px;display:flex;align-items:center;justify-content:center;background:#eee;color:#999}
"""
