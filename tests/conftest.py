"""Session fixtures: one small local Ray and one real S3 API server on loopback per test run."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


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
        AWS_SECRET_ACCESS_KEY="testing",
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

    ray.init(num_cpus=2, num_gpus=1, object_store_memory=400 * 2**20, include_dashboard=False, log_to_driver=False)
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
