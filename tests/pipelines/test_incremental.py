"""Nightly incremental runs: unchanged (sku, recipe, variant) rows are carried forward, and a
change to one source image or one recipe param regenerates exactly the rows it affects.

All S3 traffic goes through a loopback proxy that logs requests, so the test can see that
an unchanged source is only HEADed (ETag pre-check), never read.
"""

from __future__ import annotations

import io
import json

import boto3
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import render_product
from pipelines.storage import StorageConfig, arrow_filesystem, list_objects
from tests.s3_proxy import FaultProxy

N = 5
TIDY = """
name: tidy
variants: 2
ops:
  - op: white_balance
    params: {{method: gray_world, strength: {strength}}}
  - op: resize
    params: {{max_side: 256}}
"""


def _jpeg(arr, quality=92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _table(uri: str, endpoint: str) -> list[dict]:
    fs, path = arrow_filesystem(uri, StorageConfig(endpoint_url=endpoint, region="us-east-1"))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def nightly(ray_session, s3_endpoint, tmp_path_factory):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="inc-cat")
    s3.create_bucket(Bucket="inc-out")
    skus = []
    for i in range(N):
        r = render_product(300 + i, degradation="none", size=(320, 320))
        s3.put_object(Bucket="inc-cat", Key=f"img/{r.sku}.jpg", Body=_jpeg(r.photo))
        skus.append(r.sku)
    manifest = "\n".join(json.dumps({"sku": s, "image_uri": f"s3://inc-cat/img/{s}.jpg", "title": f"product {s}"}) for s in skus)
    s3.put_object(Bucket="inc-cat", Key="manifest.jsonl", Body=manifest.encode())
    recipes = tmp_path_factory.mktemp("recipes")
    tidy = recipes / "tidy.yaml"
    tidy.write_text(TIDY.format(strength=0.5))

    out = {"skus": skus, "s3": s3, "endpoint": s3_endpoint}
    with FaultProxy(s3_endpoint) as proxy:

        def run(run_id: str, **kw):
            start = len(proxy.log)
            cfg = RunConfig(manifest="s3://inc-cat/manifest.jsonl", recipes=("enhance", str(tidy)), output="s3://inc-out/nightly",
                            run_id=run_id, s3_endpoint=proxy.url, **kw)  # fmt: skip
            summary = run_catalog(cfg)
            requests = proxy.log[start:]
            # What the run itself read, up to its commit; report.html (written after the
            # commit) then reads the thumbnails of its contact sheets, sources included.
            commit = next((i for i, r in enumerate(requests) if r.method == "PUT" and r.path.endswith(f"/{run_id}/_run.json")), len(requests))
            report_reads = sum(1 for r in requests[commit:] if r.method == "GET" and "/inc-cat/img/" in r.path)
            requests = requests[:commit]
            return {
                "summary": summary,
                "variants": _table(f"s3://inc-out/nightly/{run_id}/variants", s3_endpoint),
                "source_gets": sum(1 for r in requests if r.method == "GET" and "/inc-cat/img/" in r.path),
                "source_heads": sum(1 for r in requests if r.method == "HEAD" and "/inc-cat/img/" in r.path),
                "report_source_reads": report_reads,
                "images_written": sum(1 for r in requests if r.method == "PUT" and (f"/{run_id}/images/" in r.path or f"/{run_id}/rejected/" in r.path)),
            }

        out["d1"] = run("d1")
        out["d2"] = run("d2")
        # One source image changes (re-shot): only its variants are redone.
        changed = render_product(999, degradation="none", size=(320, 320))
        s3.put_object(Bucket="inc-cat", Key=f"img/{skus[1]}.jpg", Body=_jpeg(changed.photo))
        out["d3"] = run("d3")
        # One recipe param changes: only that recipe's rows are redone.
        tidy.write_text(TIDY.format(strength=0.9))
        out["d4"] = run("d4")
        with pytest.raises(ValueError, match="already committed"):
            run("d4")
        out["d5_full"] = run("d5", full=True)
    return out


def test_first_run_generates_everything(nightly):
    s = nightly["d1"]["summary"]
    assert s.variants == N * 3 and s.generated == N * 3 and s.reused == 0 and s.errors == 0
    # tidy is deterministic: its second variant repeats the first, and says so.
    tidy = {(r["sku"], r["variant"]): r for r in nightly["d1"]["variants"] if r["recipe"] == "tidy"}
    assert all(tidy[(sku, 1)]["duplicate_of_variant"] == 0 and tidy[(sku, 0)]["duplicate_of_variant"] is None for sku in nightly["skus"])


def test_unchanged_catalog_regenerates_nothing_and_reads_no_image(nightly):
    d1, d2 = nightly["d1"], nightly["d2"]
    assert d2["summary"].generated == 0 and d2["summary"].reused == N * 3
    assert d2["images_written"] == 0
    # ETag pre-check: each source HEADed once, none read.
    assert d2["source_gets"] == 0 and d2["source_heads"] == N
    assert d2["report_source_reads"] == N  # the report's contact sheets show each source once
    first = {(r["sku"], r["recipe"], r["variant"]): r for r in d1["variants"]}
    for r in d2["variants"]:
        prev = first[(r["sku"], r["recipe"], r["variant"])]
        assert r["run_id"] == "d2" and r["reused_from"] == "d1"
        assert r["output_uri"] == prev["output_uri"] and r["output_uri"].startswith(f"s3://inc-out/nightly/d1/{'images' if r['passed'] else 'rejected'}/")
        assert r["state_key"] == prev["state_key"] and r["score_sharpness"] == prev["score_sharpness"]


def test_changed_source_regenerates_exactly_its_rows(nightly):
    d3 = nightly["d3"]
    changed = nightly["skus"][1]
    assert d3["summary"].generated == 3 and d3["summary"].reused == N * 3 - 3
    for r in d3["variants"]:
        if r["sku"] == changed:
            assert r["reused_from"] is None and r["output_uri"].startswith("s3://inc-out/nightly/d3/")
        else:
            assert r["reused_from"] == "d1"  # the run that generated it, not the one that last carried it
    assert d3["source_gets"] == 1  # only the changed image was read


def test_changed_recipe_param_regenerates_exactly_that_recipe(nightly):
    d4 = nightly["d4"]
    assert d4["summary"].generated == N * 2 and d4["summary"].reused == N
    assert {r["recipe"] for r in d4["variants"] if r["reused_from"] is None} == {"tidy"}
    assert len(d4["variants"]) == len({(r["sku"], r["recipe"], r["variant"]) for r in d4["variants"]}) == N * 3


def test_full_regenerates_and_latest_moves_only_on_commit(nightly):
    d5 = nightly["d5_full"]
    assert d5["summary"].generated == N * 3 and d5["summary"].reused == 0
    latest = json.loads(nightly["s3"].get_object(Bucket="inc-out", Key="nightly/_latest")["Body"].read())
    assert latest["run_id"] == "d5"
    storage = StorageConfig(endpoint_url=nightly["endpoint"], region="us-east-1")
    for run in ("d1", "d2", "d3", "d4", "d5"):
        assert list_objects(f"s3://inc-out/nightly/{run}/_journal", storage) == []  # removed on commit
