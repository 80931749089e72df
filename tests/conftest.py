"""Session fixtures: one small local Ray and one real S3 API server on loopback per test run."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Node-local caches (model hashes, compiled graphs) go to a per-run folder, not the user's
# home; set before Ray starts, so its workers inherit them.
_CACHES = Path(os.environ.get("TMPDIR", "/tmp")) / f"skustudio-test-caches-{os.getpid()}"
os.environ.setdefault("SKUSTUDIO_HASH_CACHE", str(_CACHES / "hashes"))
os.environ.setdefault("SKUSTUDIO_COMPILE_CACHE", str(_CACHES / "compile"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode: boto3 and pyarrow both talk HTTP to it, as they would to AWS."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # Set before Ray starts, so its workers inherit the same (fake) credentials.
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="skustudio-test-secret-7Qz1",  # distinctive, so tests can look for leaks
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """Small local Ray with one logical GPU, so GPU actor pools run on a CPU machine."""
    import ray

    # The dashboard (on loopback) serves Ray's state API, which fault tests use to find actor pids.
    ray.init(num_cpus=2, num_gpus=1, object_store_memory=400 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@pytest.fixture
def bucket(s3_endpoint, request):
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def shared_photos():
    photos = SHARED / "photos"
    if not photos.is_dir():
        pytest.skip("../shared/photos is not present on this machine")
    return photos


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random-weight models, saved the way real ones are (diffusers save_pretrained,
    safetensors state dicts): {name: local path}."""
    from tests.tiny_models import save_tiny_esrgan, save_tiny_lama, save_tiny_sd

    root = tmp_path_factory.mktemp("models")
    return {
        "sd": save_tiny_sd(root / "sd", "text2img"),
        "sd_inpaint": save_tiny_sd(root / "sd-inpaint", "inpaint"),
        "sd_instruct": save_tiny_sd(root / "sd-instruct", "instruct"),
        "esrgan_x2": save_tiny_esrgan(root / "esrgan-x2.safetensors", scale=2),
        "lama": save_tiny_lama(root / "lama.safetensors"),
    }


def upload(s3_endpoint: str, bucket: str, prefix: str, path: Path) -> str:
    """Upload a file or a folder to s3://bucket/prefix; returns the model reference."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    path = Path(path)
    if path.is_file():
        client.upload_file(str(path), bucket, prefix)
        return f"s3://{bucket}/{prefix}"
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(path).as_posix()}")
    return f"s3://{bucket}/{prefix}"
