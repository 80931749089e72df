"""The report's streaming figures on a run written by hand (no Ray): several part files, gate
retries, doubtful cutouts, reused rows and errors. Folded three rows at a time, every figure
must equal what the whole tables give when read at once."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ops.compliance import channels
from pipelines.report import render
from pipelines.report_figures import REVIEW_ROWS, gather
from pipelines.schema import ERROR_SCHEMA, VARIANT_SCHEMA
from pipelines.storage import StorageConfig


def _variant(rng: random.Random, sku: str, recipe: str, variant: int, attempt: int, last: bool) -> dict:
    doubtful = rng.random() < 0.3
    passed = last and not doubtful and rng.random() < 0.7
    row = {name: None for name in VARIANT_SCHEMA.names}
    row.update(
        sku=sku, recipe=recipe, variant=variant, attempt=attempt, source_uri=f"/nowhere/{sku}.jpg", output_uri=f"/nowhere/out/{sku}-{recipe}-{variant}-{attempt}.jpg",
        passed=passed, reasons=(["score_mask_confidence 0.31 < 0.5"] if doubtful else []) + ([] if passed else ["score_width 800 < 1000"]),
        duration_s=rng.uniform(0.5, 2.0), op_seconds={"decode": rng.uniform(0, 0.1), "sharpen": rng.uniform(0, 0.5)},
        reused_from=None if rng.random() < 0.8 else "earlier-run",
        score_mask_confidence=round(rng.uniform(0, 1), 1),  # ties: the review's order must be stable
        score_fidelity_ciede2000=rng.uniform(0, 10) if rng.random() < 0.9 else float("nan"),
        score_sharpness=rng.uniform(10, 500),
    )  # fmt: skip
    for ch, spec in channels().items():
        row[f"compliance_{ch}"] = rng.random() < 0.5
        for rule in spec.rules:
            row[f"compliance_{ch}_{rule.name}"] = rng.random() < 0.8
    return row


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    rng = random.Random(7)
    run = tmp_path_factory.mktemp("hand") / "r9"
    rows = []
    for i in range(90):
        sku = f"SKU-{rng.randrange(60):03d}"  # some SKUs listed twice
        for recipe in ("a", "b"):
            attempts = rng.choice([1, 1, 1, 2, 3])
            rows += [_variant(rng, sku, recipe, i % 2, n, n == attempts) for n in range(1, attempts + 1)]
    rng.shuffle(rows)  # a retry and the attempt it replaced land in different part files
    (run / "variants").mkdir(parents=True)
    (run / "errors").mkdir()
    for k in range(0, len(rows), 70):
        pq.write_table(pa.Table.from_pylist(rows[k : k + 70], schema=VARIANT_SCHEMA), run / "variants" / f"part-{k:04d}.parquet")
    errors = [
        {"sku": f"ERR-{k % 4}", "recipe": None if k % 3 else "a", "source_uri": f"/nowhere/err{k}.jpg", "stage": ("fetch", "decode", None)[k % 3],
         "error_type": ("SourceNotAllowed", "DecodeError", "")[k % 3], "message": f"bad row {k}"}
        for k in range(10)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{n: e.get(n) for n in ERROR_SCHEMA.names} for e in errors], schema=ERROR_SCHEMA), run / "errors" / "part-0.parquet")
    record = {"run_id": "r9", "counts": {"inputs": 94}, "timings": {"execute_s": 12.0}, "recipes": {"a": {}, "b": {}, "unused": {}}, "config": {"manifest": "/nowhere/m.jsonl"}}
    (run / "_run.json").write_text(json.dumps(record))
    return run, rows, errors


def test_streamed_figures_equal_the_whole_tables(hand_run):
    run, rows, errors = hand_run
    whole = gather(str(run), StorageConfig(), max_skus=12)
    small = gather(str(run), StorageConfig(), max_skus=12, batch_rows=3)
    assert render(small, StorageConfig()) == render(whole, StorageConfig())

    # Final attempts, computed here the plain way.
    last = {}
    for r in rows:
        key = (r["sku"], r["recipe"], r["variant"])
        last[key] = max(last.get(key, 0), r["attempt"])
    final = [r for r in rows if r["attempt"] == last[(r["sku"], r["recipe"], r["variant"])]]
    k = small.key
    assert k["variants"] == len(final) and k["retries"] == len(rows) - len(final)
    assert k["passed"] == sum(r["passed"] for r in final) and k["errors"] == len(errors)
    generated = [r for r in rows if r["reused_from"] is None]
    assert k["generated"] == len(generated) and k["worker_s_per_variant"] == pytest.approx(np.mean([r["duration_s"] for r in generated]))
    assert small.cost["sharpen"] == pytest.approx(np.mean([r["op_seconds"]["sharpen"] for r in generated]))
    assert list(small.recipes) == ["a", "b", "unused"] and small.recipes["unused"].variants == 0
    assert small.recipes["a"].attempts == sum(r["recipe"] == "a" for r in rows)
    assert small.recipes["a"].errors == sum(e["recipe"] == "a" for e in errors) == 4
    for ch in channels():
        assert small.recipes["b"].compliance[ch] == sum(bool(r[f"compliance_{ch}"]) for r in final if r["recipe"] == "b")

    # Histograms: the same bins as numpy over the whole column.
    ciede = np.array([r["score_fidelity_ciede2000"] for r in final])
    ciede = ciede[np.isfinite(ciede)]
    h = small.histograms["score_fidelity_ciede2000"]
    assert h.counts.tolist() == np.histogram(ciede, bins=20, range=(ciede.min(), ciede.max()))[0].tolist() and h.n == len(ciede)

    # Review: final rows rejected for the mask, lowest confidence first, ties in table order.
    doubtful = [r for r in final if any(x.startswith("score_mask_confidence") for x in r["reasons"])]
    order = [r for r in sorted(_in_file_order(run, doubtful), key=lambda r: (r["score_mask_confidence"], r["sku"]))]
    assert small.review_total == len(doubtful) and len(small.review) == min(len(doubtful), REVIEW_ROWS)
    assert [(r["sku"], r["recipe"], r["variant"]) for r in small.review] == [(r["sku"], r["recipe"], r["variant"]) for r in order][:REVIEW_ROWS]

    # Contact sheets: error SKUs first, then the most rejected, then by name; totals count all.
    sh = small.sheets
    assert sh.shown[:4] == ["ERR-0", "ERR-1", "ERR-2", "ERR-3"] and len(sh.shown) == 12
    rejected = {}
    for r in final:
        if not r["passed"]:
            rejected[r["sku"]] = rejected.get(r["sku"], 0) + 1
    assert sh.shown[4:] == sorted(rejected, key=lambda s: (-rejected[s], s))[:8]
    assert sh.total_skus == len({r["sku"] for r in rows}) + 4
    # Only the sources the sheets show are checked against the run's refusals (ERR-k shows err{k}).
    refused = {e["source_uri"] for e in errors if e["error_type"] == "SourceNotAllowed"}
    assert sh.refused_sources == {f"/nowhere/err{k}.jpg" for k in range(4)} & refused == {"/nowhere/err0.jpg", "/nowhere/err3.jpg"}
    assert all(len(sh.variants_of.get(s, [])) == sum(r["sku"] == s for r in rows) for s in sh.shown)
    assert [(g.stage, g.error_type, g.rows) for g in small.error_groups] == [("fetch", "SourceNotAllowed", 4), ("decode", "DecodeError", 3), ("?", "?", 3)]


def _in_file_order(run, subset: list[dict]) -> list[dict]:
    """`subset` in the order the part files hold it (the tie order a stable sort keeps)."""
    keys = [(r["sku"], r["recipe"], r["variant"], r["attempt"]) for r in pq.read_table(run / "variants").to_pylist()]
    rank = {key: n for n, key in enumerate(keys)}
    return sorted(subset, key=lambda r: rank[(r["sku"], r["recipe"], r["variant"], r["attempt"])])
