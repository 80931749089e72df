"""The model store against the loopback S3 server: one verified download per node, shared by
concurrent processes, keyed by content; partial copies never used; clear errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import boto3
import pytest

from ops.models import STORE_MARKER, ModelError, content_sha256
from pipelines.model_store import ModelStore
from pipelines.storage import StorageConfig
from tests.conftest import upload


def _downloads(cache) -> list[dict]:
    log = cache / "downloads.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_s3_model_is_downloaded_once_and_hashed_by_content(s3_endpoint, bucket, tiny_models, tmp_path):
    ref = upload(s3_endpoint, bucket, "models/sd-inpaint", tiny_models["sd_inpaint"])
    store = ModelStore(tmp_path / "cache", StorageConfig.from_env())
    info = store.describe(ref)
    assert (info.kind, info.class_name, info.unet_in_channels) == ("diffusers", "StableDiffusionInpaintPipeline", 9)
    first = store.fetch(ref)
    assert (first.path / "model_index.json").is_file()
    # The same bytes hash the same wherever they came from.
    assert first.sha256 == content_sha256(tiny_models["sd_inpaint"])
    again = ModelStore(tmp_path / "cache", StorageConfig.from_env()).fetch(ref)
    assert again.path == first.path and len(_downloads(tmp_path / "cache")) == 1
    # Identical content under another prefix: listed anew, but stored once.
    other = store.fetch(upload(s3_endpoint, bucket, "mirror/sd-inpaint", tiny_models["sd_inpaint"]))
    assert other.path == first.path and len(list((tmp_path / "cache" / "blobs").iterdir())) == 1


def test_a_changed_model_is_fetched_again(s3_endpoint, bucket, tiny_models, tmp_path):
    ref = upload(s3_endpoint, bucket, "models/esrgan.safetensors", tiny_models["esrgan_x2"])
    store = ModelStore(tmp_path / "cache", StorageConfig.from_env())
    a = store.fetch(ref)
    assert a.path.name == "esrgan.safetensors" and a.sha256 == content_sha256(a.path.parent)
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(Bucket=bucket, Key="models/esrgan.safetensors", Body=tiny_models["lama"].read_bytes())
    b = store.fetch(ref)
    assert b.sha256 != a.sha256 and len(_downloads(tmp_path / "cache")) == 2


def _fetch_in_child(cache: str, ref: str, out) -> None:
    local = ModelStore(cache, StorageConfig.from_env()).fetch(ref)
    out.put((str(local.path), local.sha256))


def test_concurrent_workers_on_a_node_share_one_download(s3_endpoint, bucket, tiny_models, tmp_path):
    ref = upload(s3_endpoint, bucket, "models/sd", tiny_models["sd"])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(str(tmp_path / "cache"), ref, out)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    results = {out.get(timeout=5) for _ in procs}
    assert len(results) == 1  # same path, same hash in every process
    assert len(_downloads(tmp_path / "cache")) == 1


def test_half_finished_copies_are_never_used(s3_endpoint, bucket, tiny_models, tmp_path):
    ref = upload(s3_endpoint, bucket, "models/sd", tiny_models["sd"])
    cache = tmp_path / "cache"
    store = ModelStore(cache, StorageConfig.from_env())
    good = store.fetch(ref)
    # A crash mid-download leaves a tmp folder; a blob that lost its marker is not trusted.
    (cache / "tmp" / "leftover").mkdir()
    shutil.rmtree(good.path / "unet")
    (good.path / STORE_MARKER).unlink()
    again = store.fetch(ref)
    assert (again.path / "unet").is_dir() and (again.path / STORE_MARKER).is_file()
    assert content_sha256(again.path) == good.sha256 and len(_downloads(cache)) == 2


def test_missing_models_are_named(s3_endpoint, bucket, tmp_path):
    store = ModelStore(tmp_path / "cache", StorageConfig.from_env())
    with pytest.raises(ModelError, match=f"s3://{bucket}/nothing/here.*not found"):
        store.describe(f"s3://{bucket}/nothing/here")
    with pytest.raises(ModelError, match="not found"):
        store.fetch(f"s3://{bucket}/nothing/here")
    with pytest.raises(ModelError, match="no-such-bucket.*cannot list"):
        store.describe("s3://no-such-bucket/m")
