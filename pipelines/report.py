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
import dataclasses
import html
import io
import json
import logging
import math
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from ops.compliance import channels
from pipelines.schema import ERROR_SCHEMA, VARIANT_SCHEMA
from pipelines.state import RUN_RECORD
from pipelines.sources import DEFAULT_MAX_SOURCE_MB, DEFAULT_SOURCE_TIMEOUT_S, SourcePolicy
from pipelines.storage import StorageConfig, StorageError, arrow_filesystem, exists, join, list_objects, read_bytes, write_bytes

log = logging.getLogger(__name__)

REPORT = "report.html"
HISTOGRAM_SCORES = (
    ("score_sharpness", "sharpness"),
    ("score_colorfulness", "colourfulness"),
    ("score_noise_sigma", "noise sigma"),
    ("score_fidelity_ciede2000", "product fidelity, mean CIEDE2000 (lower is better)"),
    ("score_fidelity_ssim", "product fidelity, SSIM"),
    ("score_brisque", "BRISQUE (lower is better)"),
    ("score_niqe", "NIQE (lower is better)"),
    ("score_mask_confidence", "product mask confidence"),
)
SHEET_SCORES = (("score_sharpness", "sharp"), ("score_fidelity_ciede2000", "ΔE"), ("score_colorfulness", "colour"), ("score_mask_confidence", "mask"))
# Doubtful cutouts listed for review (most doubtful first), at most this many rows.
REVIEW_ROWS = 200


@dataclasses.dataclass
class RunData:
    """A committed run: its record, its variants as an Arrow table (every attempt) with the
    final attempts beside it, and its error rows. Aggregates run in Arrow, so a run with a
    million variants never becomes a million Python dicts; only the contact sheets' rows do."""

    record: dict
    variants: pa.Table
    errors: list[dict]

    def __post_init__(self):
        self.final = self.variants.filter(final_mask(self.variants)) if len(self.variants) else self.variants


def load_run(run_prefix: str, storage: StorageConfig) -> RunData:
    """The committed run's record and tables; a clear error when the prefix holds no run."""
    record_uri = join(run_prefix, RUN_RECORD)
    if not exists(record_uri, storage):
        raise ValueError(f"{run_prefix} holds no committed run ({RUN_RECORD} missing); pass OUT/RUN_ID of a finished run")
    record = json.loads(read_bytes(record_uri, storage))
    variants = pa.schema([f for f in VARIANT_SCHEMA if f.name in REPORT_COLUMNS or (f.name.startswith("compliance_") and f.name != "compliance_notes")])
    return RunData(record, _table(join(run_prefix, "variants"), variants, storage), _table(join(run_prefix, "errors"), ERROR_SCHEMA, storage).to_pylist())


# The variant columns the report reads (plus every compliance_* verdict): the driver holds
# ~0.5 KB per variant instead of the table's ~1.7 KB (docs/benchmarks.md, catalog_scale).
REPORT_COLUMNS = {
    "run_id", "sku", "recipe", "variant", "source_uri", "output_uri", "attempt", "passed", "reasons", "duration_s", "op_seconds",
    "reused_from", *(col for col, _ in HISTOGRAM_SCORES), *(col for col, _ in SHEET_SCORES),
}  # fmt: skip


def _table(prefix: str, schema: pa.Schema, storage: StorageConfig) -> pa.Table:
    """The table under a prefix with `schema`'s columns (missing ones null), or an empty one."""
    files = [u for u in list_objects(prefix, storage) if u.endswith(".parquet")]
    if not files:
        return schema.empty_table()
    fs, _ = arrow_filesystem(files[0], storage)
    found = pads.dataset([arrow_filesystem(u, storage)[1] for u in files], filesystem=fs, format="parquet")
    table = found.to_table(columns=[n for n in schema.names if n in found.schema.names])
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def write_report(run_prefix: str, storage: StorageConfig, max_skus: int = 60, thumb_px: int = 144) -> str:
    """Render OUT/RUN/report.html; returns its URI."""
    data = load_run(run_prefix, storage)
    page = render(data, storage, max_skus=max_skus, thumb_px=thumb_px)
    uri = join(run_prefix, REPORT)
    write_bytes(uri, page.encode("utf-8"), storage, "text/html; charset=utf-8")
    return uri


# ------------------------------------------------------------------------------ figures


def final_mask(variants: pa.Table) -> pa.Array:
    """True for each variant's last gate attempt (what the storefront got, or why not): a row
    is superseded when the same (sku, recipe, variant) has the next attempt."""
    attempt = pc.fill_null(variants["attempt"], 1)
    later = pc.greater(attempt, 1)

    def key(t: pa.Table, att) -> pa.Array:
        return pc.binary_join_element_wise(t["sku"], t["recipe"], pc.cast(t["variant"], pa.string()), pc.cast(att, pa.string()), "\x00")

    retries = variants.filter(later)
    if not len(retries):
        return pa.array(np.ones(len(variants), bool))
    superseded = key(retries, pc.subtract(pc.fill_null(retries["attempt"], 1), 1))
    return pc.invert(pc.fill_null(pc.is_in(key(variants, attempt), value_set=superseded), False))


def _count(mask) -> int:
    return int(pc.sum(pc.fill_null(mask, False)).as_py() or 0)


def key_figures(data: RunData) -> dict[str, float | int | None]:
    v, final = data.variants, data.final
    generated = pc.is_null(v["reused_from"])
    n_generated = _count(generated)
    counts = data.record.get("counts", {})
    execute_s = float(data.record.get("timings", {}).get("execute_s") or 0.0)
    gpus = float(data.record.get("resources", {}).get("cluster_gpus") or 0.0)
    passed = _count(final["passed"])
    worker_s = pc.mean(v.filter(generated)["duration_s"]).as_py() if n_generated else None
    return {
        "inputs": counts.get("inputs"),
        "variants": len(final),
        "passed": passed,
        "rejected": len(final) - passed,
        "pass_rate": passed / len(final) if len(final) else None,
        "errors": len(data.errors),
        "retries": len(v) - len(final),
        "generated": n_generated,
        "reused": len(v) - n_generated,
        "execute_s": execute_s,
        # Throughput counts every image this run made (retries included) over the execution wall time.
        "throughput": n_generated / execute_s if execute_s > 0 and n_generated else None,
        # Summed per-row op time: what a variant cost in worker time, wherever it ran.
        "worker_s_per_variant": worker_s,
        # GPUs held for the execution, shared over the images made: an upper bound on GPU time.
        "gpu_s_per_variant": execute_s * gpus / n_generated if gpus and n_generated else None,
    }


def _fmt(v, kind: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}"


# ------------------------------------------------------------------------------ sections


def render(data: RunData, storage: StorageConfig, max_skus: int = 60, thumb_px: int = 144) -> str:
    rec = data.record
    k = key_figures(data)
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
        _recipes_section(data),
        _cost_section(data),
        _histograms_section(data),
        _compliance_section(data),
        _errors_section(data),
        _review_section(data),
        _sheets_section(data, storage, max_skus, thumb_px),
        # The only script: after load, record how many thumbnails the browser decoded (so a
        # headless check can tell a broken image from a good one). Nothing is fetched.
        "<script>addEventListener('load',()=>{const i=[...document.images];"
        "document.body.dataset.images=i.length;document.body.dataset.imagesDecoded=i.filter(x=>x.complete&&x.naturalWidth>0).length;});</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def cost_profile(data: RunData) -> dict[str, float]:
    """Mean worker-seconds per generated variant, by op ('decode', each op, 'score_models',
    'finish'), from the variants' `op_seconds` maps; aggregated in Arrow."""
    v = data.variants
    if "op_seconds" not in v.column_names or not len(v):
        return {}
    v = v.filter(pc.is_null(v["reused_from"]))
    spent = v["op_seconds"].combine_chunks()
    profiled = len(spent) - spent.null_count
    if not profiled:
        return {}
    per_op = pa.table({"op": spent.keys, "s": spent.items}).group_by("op").aggregate([("s", "sum")])
    out = {op: s / profiled for op, s in zip(per_op["op"].to_pylist(), per_op["s_sum"].to_pylist())}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _cost_section(data: RunData) -> str:
    profile = cost_profile(data)
    if not profile:
        return ""
    total = sum(profile.values())
    rows = "".join(
        f"<tr data-op='{html.escape(op)}'><td>{html.escape(op)}</td><td class='n' data-col='seconds'>{s:.3f}</td><td class='n' data-col='share'>{s / total:.0%}</td></tr>"
        for op, s in profile.items()
    )
    per_hour = 3600.0 / total if total else float("nan")
    return (
        f"<h2>Cost</h2><p>Worker-seconds per generated variant: <b id='cost-per-variant'>{total:.2f}</b> "
        f"(<span id='variants-per-cpu-hour'>{per_hour:,.0f}</span> variants per CPU-hour), by op:</p>"
        f"<table id='cost'><tr><th>op</th><th>s / variant</th><th>share</th></tr>{rows}</table>"
    )


def _recipes_section(data: RunData) -> str:
    v, final = data.variants, data.final
    rows = []
    recipes = sorted(set(v["recipe"].to_pylist()) | set(data.record.get("recipes", {})))
    for name in recipes:
        fin = final.filter(pc.equal(final["recipe"], name))
        passed = _count(fin["passed"])
        attempts = _count(pc.equal(v["recipe"], name))
        errs = sum(1 for r in data.errors if r["recipe"] == name)
        rate = passed / len(fin) if len(fin) else None
        rows.append(
            f"<tr data-recipe='{html.escape(name)}'><td>{html.escape(name)}</td><td class='n' data-col='variants'>{len(fin)}</td>"
            f"<td class='n' data-col='passed'>{passed}</td><td class='n' data-col='pass-rate'>{_fmt(rate, 'pct')}</td>"
            f"<td class='n' data-col='attempts'>{attempts}</td><td class='n' data-col='errors'>{errs}</td></tr>"
        )
    return ("<h2>Recipes</h2><table id='recipes'><tr><th>recipe</th><th>variants</th><th>passed</th><th>pass rate</th>"
            "<th>attempts</th><th>errors</th></tr>" + "".join(rows) + "</table>")  # fmt: skip


def histogram_svg(values: list[float], bins: int = 20, width: int = 320, height: int = 110) -> str:
    """A small bar histogram as inline SVG, with the range printed under it."""
    vals = np.asarray(values, np.float64)
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return "<p class='muted'>no values</p>"
    lo, hi = float(vals.min()), float(vals.max())
    counts, _ = np.histogram(vals, bins=bins, range=(lo, hi if hi > lo else lo + 1))
    top = counts.max() or 1
    bw = width / bins
    bars = "".join(
        f"<rect x='{i * bw + 1:.1f}' y='{height - 14 - (c / top) * (height - 20):.1f}' width='{bw - 2:.1f}' height='{(c / top) * (height - 20):.1f}'><title>{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    return (f"<svg width='{width}' height='{height}' role='img' data-n='{len(vals)}'>{bars}"
            f"<text x='0' y='{height - 2}'>{lo:.3g}</text><text x='{width}' y='{height - 2}' text-anchor='end'>{hi:.3g}</text></svg>")  # fmt: skip


def _histograms_section(data: RunData) -> str:
    cells = []
    for col, label in HISTOGRAM_SCORES:
        values = pc.fill_null(data.final[col], math.nan).to_numpy(zero_copy_only=False)
        if not np.isfinite(values).any():
            continue
        cells.append(f"<figure data-score='{col}'>{histogram_svg(values)}<figcaption>{html.escape(label)}</figcaption></figure>")
    return "<h2>Scores</h2><div class='hists'>" + ("".join(cells) or "<p class='muted'>no scores</p>") + "</div>"


def _compliance_section(data: RunData) -> str:
    final = data.final
    recipes = sorted(set(final["recipe"].to_pylist()))
    chans = channels()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in chans)
    rows = []
    for name in recipes:
        fin = final.filter(pc.equal(final["recipe"], name))
        cells = []
        for ch in chans:
            ok = _count(fin[f"compliance_{ch}"])
            cells.append(f"<td class='n' data-channel='{ch}' data-pass='{ok}' data-total='{len(fin)}'>{ok}/{len(fin)}</td>")
        rows.append(f"<tr data-recipe='{html.escape(name)}'><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    required = {(ch, rule.name): rule.required for ch, spec in chans.items() for rule in spec.rules}
    failed = Counter({(ch, rule): _count(pc.equal(final[f"compliance_{ch}_{rule}"], False)) for ch, rule in required})
    top = "".join(
        f"<li data-rule='{ch}_{rule}'>{html.escape(ch)} · {html.escape(rule)}{'' if required[(ch, rule)] else ' (recommended)'}: <b>{n}</b></li>"
        for (ch, rule), n in failed.most_common(12)
        if n
    )
    return (f"<h2>Marketplace compliance</h2><table id='compliance'><tr><th>recipe</th>{head}</tr>{''.join(rows)}</table>"
            f"<h3>Most failed rules</h3><ul id='failed-rules'>{top or '<li>none</li>'}</ul>")  # fmt: skip


def _errors_section(data: RunData) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in data.errors:
        groups[(r.get("stage") or "?", r.get("error_type") or "?")].append(r)
    if not groups:
        return "<h2>Errors</h2><p id='no-errors'>No error rows.</p>"
    rows = []
    for (stage, etype), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ex = items[0]
        msg = (ex.get("message") or "")[:240]
        rows.append(
            f"<tr data-stage='{html.escape(stage)}' data-error-type='{html.escape(etype)}'><td>{html.escape(stage)}</td><td>{html.escape(etype)}</td>"
            f"<td class='n' data-col='count'>{len(items)}</td><td>{html.escape(str(ex.get('sku')))}: {html.escape(msg)}</td></tr>"
        )
    return "<h2>Errors</h2><table id='errors'><tr><th>stage</th><th>error type</th><th>rows</th><th>example</th></tr>" + "".join(rows) + "</table>"


def _review_section(data: RunData) -> str:
    """Variants whose gate failed on the product mask's confidence: the segmentation model was
    unsure what the product is, so a person should look (the image is under rejected/)."""
    final = data.final
    if "score_mask_confidence" not in final.column_names or not len(final):
        return ""
    # In Arrow: the rows with a mask-confidence reason, then only those become dicts.
    flat = pc.list_flatten(final["reasons"])
    hit = pc.fill_null(pc.starts_with(flat, "score_mask_confidence"), False)
    rows_hit = pc.unique(pc.filter(pc.list_parent_indices(final["reasons"]), hit))
    if not len(rows_hit):
        return "<h2>Cutouts to review</h2><p id='no-review'>No variant was rejected for a doubtful product mask.</p>"
    picked = final.take(rows_hit).select(["sku", "recipe", "variant", "score_mask_confidence", "output_uri"])
    picked = picked.sort_by([("score_mask_confidence", "ascending"), ("sku", "ascending")])
    doubtful = picked.slice(0, REVIEW_ROWS).to_pylist()
    rows = [
        f"<tr data-sku='{html.escape(r['sku'])}' data-recipe='{html.escape(r['recipe'])}'><td>{html.escape(r['sku'])}</td><td>{html.escape(r['recipe'])}</td>"
        f"<td class='n'>{r['variant']}</td><td class='n'>{_fmt(r['score_mask_confidence'])}</td><td>{html.escape(r['output_uri'] or '')}</td></tr>"
        for r in doubtful
    ]
    more = f"<p class='muted'>{len(picked) - REVIEW_ROWS} more (filter variants/*.parquet on score_mask_confidence).</p>" if len(picked) > REVIEW_ROWS else ""
    return (
        f"<h2>Cutouts to review</h2><p class='muted'>{len(picked)} variants rejected because the product mask is doubtful; "
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


SOURCE_REFUSALS = ("SourceNotAllowed", "SourceTooLarge", "SourceTimeout")


def source_policy_of(record: dict) -> SourcePolicy:
    """The source policy the run used, rebuilt from its _run.json config."""
    cfg = record.get("config", {})
    return SourcePolicy.for_manifest(
        cfg.get("manifest") or "", tuple(cfg.get("source_prefixes") or ()),
        max_source_mb=cfg.get("max_source_mb") or DEFAULT_MAX_SOURCE_MB, timeout_s=cfg.get("source_timeout_s") or DEFAULT_SOURCE_TIMEOUT_S,
    )  # fmt: skip


def _sheets_section(data: RunData, storage: StorageConfig, max_skus: int, thumb_px: int) -> str:
    errors_of: dict[str, list[dict]] = defaultdict(list)  # one pass over the error rows, not one per SKU shown
    for r in data.errors:
        if r.get("sku"):
            errors_of[r["sku"]].append(r)
    rejected = Counter(data.final.filter(pc.invert(pc.fill_null(data.final["passed"], False)))["sku"].to_pylist())
    # SKUs needing attention first: errors, then rejected variants; then the rest by name
    # (only the first max_skus names leave Arrow: no Python list of the whole catalog).
    attention = sorted(set(errors_of) | set(rejected), key=lambda s: (-(s in errors_of), -rejected[s], s))
    names = pc.unique(data.variants["sku"])
    first = names.take(pc.sort_indices(names)[: max_skus + len(attention)]).to_pylist() if len(names) else []
    shown = (attention + [s for s in first if s not in set(attention)])[:max_skus]
    by_sku: dict[str, list[dict]] = defaultdict(list)
    for r in data.variants.filter(pc.is_in(data.variants["sku"], value_set=pa.array(shown, pa.string()))).to_pylist():
        by_sku[r["sku"]].append(r)
    sources = {sku: (by_sku.get(sku) or errors_of.get(sku) or [{}])[0].get("source_uri") for sku in shown}
    # A source the run refused (not allowed, too large, too slow) is not read for a thumbnail.
    refused = {r.get("source_uri") for r in data.errors if r.get("error_type") in SOURCE_REFUSALS}
    policy = source_policy_of(data.record)
    # Thumbnails are many small reads (S3 GETs): fetch them concurrently.
    src_uris = {u for u in sources.values() if u and u not in refused}
    out_uris = {r["output_uri"] for sku in shown for r in by_sku.get(sku, []) if r.get("output_uri")}
    with ThreadPoolExecutor(max_workers=16) as pool:
        thumbs = dict(zip(src_uris, pool.map(lambda u: thumbnail(u, storage, thumb_px, policy), src_uris)))
        thumbs.update(zip(out_uris, pool.map(lambda u: thumbnail(u, storage, thumb_px), out_uris)))
    cards = []
    for sku in shown:
        rows = sorted(by_sku.get(sku, []), key=lambda r: (r["recipe"], r["variant"], r.get("attempt") or 1))
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
        for er in errors_of.get(sku, []):
            tiles.append(f"<div class='tile err'><div class='cap'><b>error</b> {html.escape(er.get('stage') or '')}: {html.escape((er.get('message') or '')[:160])}</div></div>")
        cards.append(f"<div class='sku' data-sku='{html.escape(sku)}'><h3>{html.escape(sku)}</h3><div class='tiles'>{''.join(tiles)}</div></div>")
    error_only = pc.invert(pc.is_in(pa.array(list(errors_of), pa.string()), value_set=names)) if errors_of else pa.array([], pa.bool_())
    total = len(names) + pc.sum(error_only).as_py() if errors_of else len(names)
    more = f"<p class='muted' id='sheets-more'>{total - len(shown)} more SKUs not shown (see variants/*.parquet).</p>" if total > len(shown) else ""
    return f"<h2>Contact sheets</h2><div id='sheets' data-shown='{len(shown)}' data-total='{total}'>{''.join(cards)}</div>{more}"


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
