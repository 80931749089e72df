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
    # A planted bad mask: a contact sheet of nine products sent as one SKU's photo. Which one is
    # the product? The segmentation model cannot say, so its cutout must be rejected, not published.
    tiles = [render_product(200 + i, background="cluttered", degradation="none", size=(240, 240)).photo for i in range(9)]
    sheet = np.concatenate([np.concatenate(tiles[i * 3 : i * 3 + 3], 1) for i in range(3)], 0)
    s3.put_object(Bucket="catalog", Key="img/sheet.jpg", Body=_jpeg(sheet))
    rows.append({"sku": "SHEET-1", "image_uri": "s3://catalog/img/sheet.jpg", "title": "nine things", "recipes": ["cutout"]})
    bad = [
        {"sku": "HTML-1", "image_uri": "s3://catalog/img/page.jpg"},
        {"sku": "MISSING-1", "image_uri": "s3://catalog/img/nope.jpg"},
        {"sku": "", "image_uri": "s3://catalog/img/x.jpg"},
        {"sku": "../../escape", "image_uri": f"s3://catalog/img/{rows[0]['sku']}.jpg", "recipes": ["enhance"]},
    ]
    lines = [json.dumps(r) for r in rows + bad] + ["", '{"sku": "TRUNC", "image_uri": "s3://cat']
    s3.put_object(Bucket="catalog", Key="manifest.jsonl", Body="\n".join(lines).encode())
    cfg = RunConfig(manifest="s3://catalog/manifest.jsonl", recipes=("marketplace-main", "enhance", "cutout"), output="s3://out/runs", run_id="t1", max_error_rate=0.5)
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
    # 4 good rows x 3 recipes + the traversal sku and the contact sheet with 1 recipe each
    assert len(v) == N_GOOD * 3 + 2, [(r["sku"], r["recipe"], r["stage"], r["message"]) for r in e]
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
    assert set(record["recipes"]) == {"marketplace-main", "enhance", "cutout"}
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


def test_cutouts_are_rgba_at_source_size_with_a_soft_matte(s3_run):
    s3 = s3_run["s3"]
    cutouts = [r for r in s3_run["variants"] if r["recipe"] == "cutout" and r["sku"] in s3_run["truth"]]
    assert len(cutouts) == N_GOOD
    soft = 0
    for row in cutouts:
        truth = s3_run["truth"][row["sku"]]
        assert row["passed"] and row["format"] == "PNG", row["reasons"]
        assert row["model"] == ["builtin:u2netp"] and len(row["model_sha256"][0]) == 64
        assert row["score_mask_confidence"] >= 0.5
        body = s3.get_object(Bucket="out", Key=row["output_uri"].removeprefix("s3://out/"))["Body"].read()
        with Image.open(io.BytesIO(body)) as im:
            assert im.mode == "RGBA" and im.size == (truth.photo.shape[1], truth.photo.shape[0])
            rgba = np.asarray(im)
        alpha = rgba[..., 3]
        inter = ((alpha >= 128) & (truth.mask > 0)).sum()
        assert inter / ((alpha >= 128) | (truth.mask > 0)).sum() > 0.95
        soft += int(((alpha > 0) & (alpha < 255)).sum())
        assert (rgba[alpha == 0][:, :3] == 0).all()  # no hidden backdrop under full transparency
    assert soft > 0  # soft edges where the photo's edges are soft (a box's straight edges may be crisp)
    # Every variant that went through segmentation carries the confidence; others do not.
    for row in s3_run["variants"]:
        if row["recipe"] == "enhance":
            assert row["score_mask_confidence"] is None
        else:
            assert row["score_mask_confidence"] is not None, row


def test_a_doubtful_cutout_goes_to_rejected_and_the_report_lists_it(s3_run):
    (row,) = [r for r in s3_run["variants"] if r["sku"] == "SHEET-1"]
    assert not row["passed"] and row["score_mask_confidence"] < 0.5
    assert row["output_uri"].startswith("s3://out/runs/t1/rejected/")
    assert any(x.startswith("score_mask_confidence") for x in row["reasons"]), row["reasons"]
    published = s3_run["s3"].list_objects_v2(Bucket="out", Prefix="runs/t1/images/")["Contents"]
    assert not [o for o in published if "SHEET-1" in o["Key"]]
    report = s3_run["s3"].get_object(Bucket="out", Key="runs/t1/report.html")["Body"].read().decode()
    review = report.split("<table id='review'>")[1].split("</table>")[0]
    assert "data-sku='SHEET-1'" in review
    assert all(f"data-sku='{sku}'" not in review for sku in s3_run["truth"])


def test_every_variant_says_where_its_worker_seconds_went_and_the_report_sums_them(s3_run):
    for row in s3_run["variants"]:
        spent = dict(row["op_seconds"])
        assert {"decode", "finish"} <= set(spent) and all(s >= 0 for s in spent.values()), spent
        assert abs(sum(spent.values()) - row["duration_s"]) < 1e-6 * max(1.0, row["duration_s"])
        if row["recipe"] == "marketplace-main":
            assert {"white_balance", "remove_background", "compose"} <= set(spent)
    report = s3_run["s3"].get_object(Bucket="out", Key="runs/t1/report.html")["Body"].read().decode()
    cost = report.split("<table id='cost'>")[1].split("</table>")[0]
    assert "data-op='remove_background'" in cost and "data-op='decode'" in cost
    mean_total = np.mean([r["duration_s"] for r in s3_run["variants"]])
    shown = float(report.split("id='cost-per-variant'>")[1].split("<")[0])
    assert abs(shown - mean_total) < 0.01 + 0.01 * mean_total
