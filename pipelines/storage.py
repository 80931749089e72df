"""Reading and writing objects by URI: local paths and `s3://bucket/key`.

boto3 serves object reads and writes (images, run.json); pyarrow's S3FileSystem serves Parquet
(through Ray Data). Both honour the standard AWS environment and config files; the endpoint
override (`AWS_ENDPOINT_URL` or `--s3-endpoint`) is carried explicitly in `StorageConfig` so
that workers on other nodes use the same endpoint as the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import urllib.parse
from pathlib import Path

import boto3
import pyarrow.fs as pafs
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError


class StorageError(RuntimeError):
    """An object could not be read or written; the message names the URI and what to do."""


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8

    @classmethod
    def from_env(cls, endpoint_url: str | None = None) -> StorageConfig:
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"not an s3 URI: {uri!r}; expected s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


def join(prefix: str, *parts: str) -> str:
    out = prefix.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


_clients: dict[StorageConfig, object] = {}
_clients_lock = threading.Lock()


def s3_client(cfg: StorageConfig):
    """One boto3 client per process and config (clients are thread-safe; sessions are not)."""
    with _clients_lock:
        client = _clients.get(cfg)
        if client is None:
            # Transient errors (503 SlowDown, throttling, connection resets, read timeouts) are
            # retried by botocore's adaptive mode, not by a loop of ours.
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=cfg.endpoint_url,
                region_name=cfg.region,
                config=BotoConfig(retries={"max_attempts": cfg.max_attempts, "mode": "adaptive"}, max_pool_connections=32),
            )
            _clients[cfg] = client
        return client


def arrow_filesystem(uri: str, cfg: StorageConfig) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for `uri` (local paths are made absolute)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        kwargs = {"region": cfg.region}
        if cfg.endpoint_url:
            parsed = urllib.parse.urlparse(cfg.endpoint_url)
            kwargs.update(endpoint_override=parsed.netloc or cfg.endpoint_url, scheme=parsed.scheme or "https")
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def read_bytes(uri: str, cfg: StorageConfig) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return s3_client(cfg).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"no object at {uri} (404); check the manifest's image_uri") from None
            if code in ("AccessDenied", "403", "Forbidden"):
                raise StorageError(f"access denied reading {uri} (403); grant s3:GetObject to the job's role") from None
            if code == "NoSuchBucket":
                raise StorageError(f"bucket of {uri} does not exist") from None
            raise StorageError(f"could not read {uri}: {code or exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"could not read {uri}: {exc}") from None
    path = Path(uri.removeprefix("file://")).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"no file at {path}; check the manifest's image_uri") from None
    except IsADirectoryError:
        raise StorageError(f"{path} is a directory, not an image file") from None
    except PermissionError:
        raise StorageError(f"permission denied reading {path}") from None


def write_bytes(uri: str, data: bytes, cfg: StorageConfig, content_type: str = "application/octet-stream") -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(cfg).put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"could not write {uri}: {exc}") from None
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written file


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key_part(value: str, max_len: int = 48) -> str:
    """A path segment derived from an untrusted value (a sku): readable, unique, and unable
    to escape its prefix. '../../x' -> 'x-<hash>'; the hash keeps distinct values distinct
    after sanitising."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    readable = _SAFE.sub("_", value).strip("._-")[:max_len] or "x"
    return f"{readable}-{digest}"
