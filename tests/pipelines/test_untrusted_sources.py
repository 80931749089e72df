"""Untrusted manifests: a row may name only allowed sources, of bounded size, arriving in
bounded time (pipelines/sources.py). The run goes through a counting proxy in front of the
loopback S3 server, so "never requested" is checked against the requests actually made."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from pipelines.cli import _config_file
from pipelines.run import RunConfig, run_catalog
from pipelines.sources import SourceNotAllowed, SourcePolicy, SourceTimeout, SourceTooLarge, fetch_threads
from pipelines.storage import StorageConfig, arrow_filesystem
from tests.s3_proxy import FaultProxy


def _jpeg(seed: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 235, np.uint8)
    img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = rng.integers(40, 200, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- the policy alone


def test_defaults_follow_where_the_manifest_is():
    remote = SourcePolicy.for_manifest("s3://catalog/feeds/m.jsonl")
    assert remote.prefixes == ("s3://catalog/",)
    assert remote.check("s3://catalog/img/a.jpg") == "s3://catalog/img/a.jpg"
    for uri in ("s3://catalog-internal/a.jpg", "s3://other/a.jpg"):  # a bucket whose name starts the same is another bucket
        with pytest.raises(SourceNotAllowed, match="outside the allowed source prefixes"):
            remote.check(uri)
    with pytest.raises(SourceNotAllowed, match="a manifest on S3 may not name node files"):
        remote.check("/etc/hostname")
    with pytest.raises(SourceNotAllowed, match=r"'\.\.'"):
        remote.check("s3://catalog/img/../../other/a.jpg")
    local = SourcePolicy.for_manifest("/data/m.jsonl")
    assert local.check("/anywhere/a.jpg") == "/anywhere/a.jpg"
    with pytest.raises(SourceNotAllowed, match="--source-prefix"):
        local.check("s3://catalog/a.jpg")
    assert remote.max_bytes == 50 * 2**20 and remote.timeout_s == 60


def test_a_symlink_or_dotdot_out_of_an_allowed_tree_is_refused(tmp_path):
    tree, outside = tmp_path / "catalog", tmp_path / "secrets"
    tree.mkdir()
    outside.mkdir()
    (outside / "key.jpg").write_bytes(_jpeg(0))
    (tree / "ok.jpg").write_bytes(_jpeg(1))
    os.symlink(outside / "key.jpg", tree / "innocent.jpg")
    policy = SourcePolicy.for_manifest(str(tree / "m.jsonl"), [str(tree)])
    assert policy.read(str(tree / "ok.jpg"), StorageConfig()).data == _jpeg(1)
    for uri in (str(tree / "innocent.jpg"), f"{tree}/../secrets/key.jpg", f"file://{outside}/key.jpg"):
        with pytest.raises(SourceNotAllowed, match="outside the allowed source prefixes"):
            policy.read(uri, StorageConfig())
    # A prefix is a directory, not a string prefix: /x/catalog-old is not under /x/catalog.
    (tmp_path / "catalog-old").mkdir()
    (tmp_path / "catalog-old" / "a.jpg").write_bytes(_jpeg(2))
    with pytest.raises(SourceNotAllowed):
        policy.check(str(tmp_path / "catalog-old" / "a.jpg"))


def test_a_local_file_over_the_cap_is_refused_by_its_size(tmp_path):
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff" * (3 * 2**20))
    policy = SourcePolicy.for_manifest(str(tmp_path / "m.jsonl"), max_source_mb=2)
    with pytest.raises(SourceTooLarge, match=r"3\.0 MB, over the 2 MB cap"):
        policy.read(str(big), StorageConfig())


def test_fetch_threads_follow_memory_and_the_cap():
    mb = 2**20
    assert fetch_threads(2048 * mb, 50 * mb, batch_size=64) == 16  # plenty of memory: the ceiling
    assert fetch_threads(400 * mb, 50 * mb, batch_size=64) == 4  # half of 400 MB holds four 50 MB sources
    assert fetch_threads(400 * mb, 500 * mb, batch_size=64) == 1  # never zero
    assert fetch_threads(None, 50 * mb, batch_size=3) == 3


def test_the_policy_can_come_from_a_config_file(tmp_path):
    path = tmp_path / "skustudio.yaml"
    path.write_text("source_prefix: s3://catalog-images/\nmax_source_mb: 20\n")
    assert _config_file(path, "run") == {"source_prefix": ["s3://catalog-images/"], "max_source_mb": 20}
    path.write_text("source_prefixes: [s3://x/]\n")
    with pytest.raises(ValueError, match="'source_prefixes' is not an option"):
        _config_file(path, "run")


# --------------------------------------------------------------------------- a run on S3


@pytest.fixture(scope="module")
def untrusted_run(ray_session, s3_endpoint, tmp_path_factory):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for b in ("feed", "internal"):
        s3.create_bucket(Bucket=b)
    s3.put_object(Bucket="internal", Key="secret/plan.jpg", Body=_jpeg(9))
    s3.put_object(Bucket="feed", Key="img/huge.jpg", Body=b"\xff\xd8" + b"\0" * (200 * 2**20))
    s3.put_object(Bucket="feed", Key="img/stall.jpg", Body=_jpeg(8))
    node_file = tmp_path_factory.mktemp("node") / "mounted-secret.jpg"
    node_file.write_bytes(_jpeg(7))
    rows = []
    for i in range(5):
        s3.put_object(Bucket="feed", Key=f"img/good{i}.jpg", Body=_jpeg(i))
        rows.append({"sku": f"GOOD-{i}", "image_uri": f"s3://feed/img/good{i}.jpg"})
    rows[1:1] = [
        {"sku": "OTHER-BUCKET", "image_uri": "s3://internal/secret/plan.jpg"},
        {"sku": "NODE-FILE", "image_uri": str(node_file)},
        {"sku": "HUGE", "image_uri": "s3://feed/img/huge.jpg"},
        {"sku": "STALL", "image_uri": "s3://feed/img/stall.jpg"},
        {"sku": "MASK-ELSEWHERE", "image_uri": "s3://feed/img/good0.jpg", "overlay_mask_uri": "s3://internal/secret/plan.jpg"},
    ]
    s3.put_object(Bucket="feed", Key="manifest.jsonl", Body="\n".join(json.dumps(r) for r in rows).encode())
    with FaultProxy(s3_endpoint, stall=("/img/stall.jpg",), stall_s=60) as proxy:
        summary = run_catalog(RunConfig(manifest="s3://feed/manifest.jsonl", recipes=("enhance",), output="s3://feed/out", run_id="u1",
                                        s3_endpoint=proxy.url, max_error_rate=1.0, source_timeout_s=3, cpu_batch_size=4))  # fmt: skip
        requests = list(proxy.log)
    fs, path = arrow_filesystem("s3://feed/out/u1", StorageConfig(endpoint_url=s3_endpoint, region="us-east-1"))
    table = lambda name: pads.dataset(f"{path}/{name}", filesystem=fs, format="parquet").to_table().to_pylist()  # noqa: E731
    return {"summary": summary, "variants": table("variants"), "errors": {e["sku"]: e for e in table("errors")}, "requests": requests}


def _requests(run, method: str, contains: str) -> int:
    return sum(1 for r in run["requests"] if r.method == method and contains in r.path)


def test_rows_outside_the_policy_are_error_rows_and_the_good_rows_publish(untrusted_run):
    variants, errors = untrusted_run["variants"], untrusted_run["errors"]
    assert sorted(v["sku"] for v in variants) == [f"GOOD-{i}" for i in range(5)]
    assert set(errors) == {"OTHER-BUCKET", "NODE-FILE", "HUGE", "STALL", "MASK-ELSEWHERE"}
    assert all(e["stage"] == "fetch" for e in errors.values())
    for sku in ("OTHER-BUCKET", "NODE-FILE", "MASK-ELSEWHERE"):
        assert errors[sku]["error_type"] == "SourceNotAllowed" and "s3://feed/" in errors[sku]["message"], errors[sku]
    assert "node files" in errors["NODE-FILE"]["message"]


def test_a_source_in_another_bucket_is_never_requested(untrusted_run):
    assert _requests(untrusted_run, "GET", "/internal/") == 0 and _requests(untrusted_run, "HEAD", "/internal/") == 0


def test_a_200_mb_object_is_refused_by_its_size_without_a_download(untrusted_run):
    e = untrusted_run["errors"]["HUGE"]
    assert e["error_type"] == "SourceTooLarge" and "200.0 MB, over the 50 MB cap" in e["message"], e
    assert _requests(untrusted_run, "HEAD", "/img/huge.jpg") == 1 and _requests(untrusted_run, "GET", "/img/huge.jpg") == 0


def test_a_stalled_source_times_out_and_its_batch_finishes(untrusted_run):
    e = untrusted_run["errors"]["STALL"]
    assert e["error_type"] == "SourceTimeout" and "--source-timeout" in e["message"], e
    # STALL shared a fetch batch (4 rows) with good rows; they were published. The proxy
    # releases held requests only when it closes, after run_catalog returned: the run never
    # waited for an answer. Each attempt is one request; the source client makes two at most.
    assert len(untrusted_run["variants"]) == 5
    assert 1 <= _requests(untrusted_run, "HEAD", "/img/stall.jpg") <= 2 and _requests(untrusted_run, "GET", "/img/stall.jpg") == 0
