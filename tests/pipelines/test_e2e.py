"""End to end on local Ray: manifest, images and outputs on the loopback S3 server."""

from __future__ import annotations

import io
import json
import os

import boto3
import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from ops.provenance import read_xmp
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import render_product
from pipelines.storage import StorageConfig, arrow_filesystem

N_GOOD = 4


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _read(uri: str, endpoint: str):
    fs, path = arrow_filesystem(uri, StorageConfig(endpoint_url=endpoint, region="us-east-1"))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def s3_run(ray_session, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="catalog")
    s3.create_bucket(Bucket="out")
    rows, truth = [], {}
    for i in range(N_GOOD):
        r = render_product(100 + i, background="plain", degradation="none", size=(900, 900))
        s3.put_object(Bucket="catalog", Key=f"img/{r.sku}.jpg", Body=_jpeg(r.photo))
        rows.append({"sku": r.sku, "image_uri": f"s3://catalog/img/{r.sku}.jpg", "title": r.title, "attributes": {"k": "v"}})
        truth[r.sku] = r
    s3.put_object(Bucket="catalog", Key="img/page.jpg", Body=b"<!DOCTYPE html><html>oops</html>")
    bad = [
        {"sku": "HTML-1", "image_uri": "s3://catalog/img/page.jpg"},
        {"sku": "MISSING-1", "image_uri": "s3://catalog/img/nope.jpg"},
        {"sku": "", "image_uri": "s3://catalog/img/x.jpg"},
        {"sku": "../../escape", "image_uri": f"s3://catalog/img/{rows[0]['sku']}.jpg", "recipes": ["enhance"]},
    ]
    lines = [json.dumps(r) for r in rows + bad] + ["", '{"sku": "TRUNC", "image_uri": "s3://cat']
    s3.put_object(Bucket="catalog", Key="manifest.jsonl", Body="\n".join(lines).encode())
    cfg = RunConfig(manifest="s3://catalog/manifest.jsonl", recipes=("marketplace-main", "enhance"), output="s3://out/runs", run_id="t1", max_error_rate=0.5)
    summary = run_catalog(cfg)
    return {
        "summary": summary,
        "variants": _read("s3://out/runs/t1/variants", s3_endpoint),
        "errors": _read("s3://out/runs/t1/errors", s3_endpoint),
        "truth": truth,
        "s3": s3,
        "n_inputs": len(rows) + len(bad) + 1,  # + the truncated line
    }


def test_every_manifest_row_ends_in_exactly_one_table(s3_run):
    v, e = s3_run["variants"], s3_run["errors"]
    # 4 good rows x 2 recipes + the traversal sku with 1 recipe
    assert len(v) == N_GOOD * 2 + 1, [(r["sku"], r["recipe"], r["stage"], r["message"]) for r in e]
    assert len({(r["sku"], r["recipe"], r["variant"]) for r in v}) == len(v)
    input_errors = [r for r in e if r["recipe"] is None]
    assert len(input_errors) == 4  # html, missing key, empty sku, truncated line
    assert s3_run["summary"].inputs == s3_run["n_inputs"]
    stages = {r["sku"] or r["message"][:20]: r["stage"] for r in input_errors}
    assert stages["HTML-1"] == "decode" and stages["MISSING-1"] == "fetch"
    by_sku = {r["sku"]: r for r in input_errors}
    assert "HTML" in by_sku["HTML-1"]["message"] and "404" in by_sku["MISSING-1"]["message"]
    assert any("not valid JSON" in r["message"] for r in input_errors)
    assert any("sku is empty" in r["message"] for r in input_errors)


def test_variant_rows_follow_the_contract(s3_run):
    required = {"run_id", "sku", "recipe", "variant", "source_uri", "source_sha256", "output_uri", "width", "height", "format",
                "seed", "recipe_hash", "ops", "passed", "reasons", "duration_s", "score_sharpness", "score_noise_sigma",
                "score_fidelity_ssim", "score_fidelity_ciede2000", "phash"}  # fmt: skip
    for row in s3_run["variants"]:
        assert required <= set(row)
        assert row["run_id"] == "t1" and row["output_uri"].startswith(f"s3://out/runs/t1/{'images' if row['passed'] else 'rejected'}/")
        assert ".." not in row["output_uri"]
        assert all("@" in op for op in row["ops"]) and row["duration_s"] > 0
        assert len(row["source_sha256"]) == 64


def test_marketplace_outputs_are_white_square_and_faithful(s3_run):
    s3 = s3_run["s3"]
    for row in s3_run["variants"]:
        if row["recipe"] != "marketplace-main" or row["sku"] not in s3_run["truth"]:
            continue
        assert (row["width"], row["height"]) == (1600, 1600) and row["passed"], row["reasons"]
        key = row["output_uri"].removeprefix("s3://out/")
        img = np.asarray(Image.open(io.BytesIO(s3.get_object(Bucket="out", Key=key)["Body"].read())).convert("RGB"))
        assert img.shape == (1600, 1600, 3)
        border = np.concatenate([img[:8].reshape(-1, 3), img[-8:].reshape(-1, 3)])
        assert border.min() >= 254  # JPEG keeps a flat white border at 255 (+-1)
        assert row["score_fidelity_ciede2000"] < 3.0, row["score_fidelity_ciede2000"]
        assert row["compliance_amazon_main"], row["compliance_notes"]
        # Enhancement only: not labelled AI-generated, no watermark.
        assert row["ai_generated"] is False and row["watermark_id"] is None
        assert read_xmp(s3_run["s3"].get_object(Bucket="out", Key=key)["Body"].read()) == {}
        # The product's footprint matches the truth mask after the same move.
        assert 0.80 <= row["score_fidelity_ssim"] <= 1.0


def test_run_json_written_last_with_counts_and_versions(s3_run):
    body = s3_run["s3"].get_object(Bucket="out", Key="runs/t1/_run.json")["Body"].read()
    record = json.loads(body)
    assert record["counts"]["variants"] == len(s3_run["variants"])
    assert record["counts"]["errors"] == len(s3_run["errors"])
    assert set(record["recipes"]) == {"marketplace-main", "enhance"}
    assert record["packages"]["ray"].startswith("2.60")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in body.decode()  # no credentials in the record


def test_rerun_reproduces_images_and_seeds(s3_run, s3_endpoint):
    # --full: regenerate rather than carry t1's rows forward, so this compares two generations.
    cfg = RunConfig(manifest="s3://catalog/manifest.jsonl", recipes=("enhance",), output="s3://out/runs", run_id="t2", full=True, max_error_rate=0.5)
    summary = run_catalog(cfg)
    assert summary.reused == 0 and summary.generated == summary.variants
    again = {(r["sku"], r["variant"]): r for r in _read("s3://out/runs/t2/variants", s3_endpoint)}
    for r in s3_run["variants"]:
        if r["recipe"] == "enhance":
            other = again[(r["sku"], r["variant"])]
            assert other["output_sha256"] == r["output_sha256"] and other["seed"] == r["seed"]
            assert other["output_uri"].startswith("s3://out/runs/t2/") and other["reused_from"] is None
