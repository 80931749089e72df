"""CSV and Parquet manifests on local paths give the same rows as JSONL."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import write_sample_catalog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmt")
    manifest = write_sample_catalog(d / "cat", 2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows.append({"sku": "GONE", "image_uri": str(d / "cat" / "images" / "nope.jpg")})
    return d, rows


def test_csv_manifest(ray_session, catalog):
    d, rows = catalog
    path = d / "m.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sku", "image_uri", "title", "attributes"])
        w.writeheader()
        for r in rows:
            w.writerow({"sku": r["sku"], "image_uri": r["image_uri"], "title": r.get("title", ""), "attributes": json.dumps(r.get("attributes", {}))})
    with path.open("a") as f:
        f.write("BAD-1,/nowhere.jpg,a title, with a comma,{}\n")  # one field too many: one error row
    s = run_catalog(RunConfig(manifest=str(path), recipes=("enhance",), output=str(d / "out"), run_id="csv", max_error_rate=0.5))
    assert (s.inputs, s.variants, s.errors) == (4, 2, 2)
    assert s.errors_by_stage == {"fetch": 1, "manifest": 1}
    errors = pq.read_table(d / "out" / "csv" / "errors").to_pylist()
    assert any("5 fields where the header has 4" in e["message"] and "BAD-1" in e["message"] for e in errors), errors
    # Read as a JSONL copy under the run (every pass in byte ranges), deleted by the commit.
    assert not (d / "out" / "csv" / "_manifest").exists() or not any((d / "out" / "csv" / "_manifest").iterdir())


def test_parquet_manifest_with_map_attributes(ray_session, catalog):
    d, rows = catalog
    table = pa.table(
        {
            "sku": [r["sku"] for r in rows],
            "image_uri": [r["image_uri"] for r in rows],
            "attributes": pa.array([list(r.get("attributes", {}).items()) for r in rows], pa.map_(pa.string(), pa.string())),
        }
    )
    pq.write_table(table, d / "m.parquet")
    s = run_catalog(RunConfig(manifest=str(d / "m.parquet"), recipes=("enhance",), output=str(d / "out"), run_id="pq", max_error_rate=0.5))
    assert (s.inputs, s.variants, s.errors) == (3, 2, 1)
    errors = pq.read_table(d / "out" / "pq" / "errors").to_pylist()
    assert errors[0]["sku"] == "GONE" and "no file at" in errors[0]["message"]
