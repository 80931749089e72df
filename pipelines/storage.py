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


SSE_MODES = ("AES256", "aws:kms")


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8
    # Server-side encryption applied to every object skustudio writes to S3: None (the
    # bucket's default), "AES256" (SSE-S3) or "aws:kms" (SSE-KMS, with an optional key id).
    sse: str | None = None
    sse_kms_key_id: str | None = None

    def __post_init__(self):
        if self.sse not in (None, *SSE_MODES):
            raise ValueError(f"server-side encryption {self.sse!r} is not one of {', '.join(SSE_MODES)}")
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("an SSE-KMS key id needs --sse aws:kms")

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, sse: str | None = None, sse_kms_key_id: str | None = None) -> StorageConfig:
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            sse=sse,
            sse_kms_key_id=sse_kms_key_id,
        )

    def put_args(self) -> dict[str, str]:
        """Extra PutObject arguments for this config's server-side encryption."""
        args = {}
        if self.sse:
            args["ServerSideEncryption"] = self.sse
        if self.sse_kms_key_id:
            args["SSEKMSKeyId"] = self.sse_kms_key_id
        return args


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
        # Reads through pyarrow (manifests, earlier runs' tables) retry like boto3 does.
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts)
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


@dataclasses.dataclass(frozen=True)
class ObjectData:
    data: bytes
    etag: str = ""  # S3 ETag ('' for local files: they have none we can trust)


@dataclasses.dataclass(frozen=True)
class ObjectMeta:
    etag: str
    size: int


def _s3_error(uri: str, exc: Exception, verb: str = "reading") -> StorageError:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"no object at {uri} (404); check the manifest's image_uri")
        if code in ("AccessDenied", "403", "Forbidden"):
            return StorageError(f"access denied {verb} {uri} (403); grant s3:GetObject to the job's role")
        if code == "NoSuchBucket":
            return StorageError(f"bucket of {uri} does not exist")
        return StorageError(f"could not read {uri}: {code or exc}")
    return StorageError(f"could not read {uri}: {exc}")


def read_object(uri: str, cfg: StorageConfig) -> ObjectData:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            resp = s3_client(cfg).get_object(Bucket=bucket, Key=key)
            return ObjectData(resp["Body"].read(), resp.get("ETag", ""))
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, exc) from None
    path = Path(uri.removeprefix("file://")).expanduser()
    try:
        return ObjectData(path.read_bytes())
    except FileNotFoundError:
        raise StorageError(f"no file at {path}; check the manifest's image_uri") from None
    except IsADirectoryError:
        raise StorageError(f"{path} is a directory, not an image file") from None
    except PermissionError:
        raise StorageError(f"permission denied reading {path}") from None


def read_bytes(uri: str, cfg: StorageConfig) -> bytes:
    return read_object(uri, cfg).data


def read_range(uri: str, cfg: StorageConfig, offset: int, length: int) -> bytes:
    """`length` bytes of an object from `offset` (one ranged GET on S3)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            resp = s3_client(cfg).get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
            return resp["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise _s3_error(uri, exc) from None
    path = Path(uri.removeprefix("file://")).expanduser()
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
    except OSError as exc:
        raise StorageError(f"could not read {path}: {exc}") from None


def head_object(uri: str, cfg: StorageConfig) -> ObjectMeta:
    """ETag and size of an S3 object without reading it."""
    bucket, key = split_s3(uri)
    try:
        resp = s3_client(cfg).head_object(Bucket=bucket, Key=key)
        return ObjectMeta(resp.get("ETag", ""), int(resp["ContentLength"]))
    except (ClientError, BotoCoreError) as exc:
        raise _s3_error(uri, exc, "checking") from None


def write_bytes(uri: str, data: bytes, cfg: StorageConfig, content_type: str = "application/octet-stream") -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(cfg).put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, **cfg.put_args())
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"could not write {uri}: {exc}") from None
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    tmp = _temp_beside(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written file


def _temp_beside(path: Path) -> Path:
    """A temp file name next to `path` (its folder made), unique to this process and thread:
    written, then renamed onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


class StreamingUpload:
    """One object of unknown size, written in pieces: an S3 multipart upload (each part
    carries the config's server-side encryption; all but the last >= PART_BYTES, S3's floor
    being 5 MiB), or a local temp file renamed into place. Nothing is visible at `uri` until
    `close()`; an exception inside `with` aborts and leaves nothing."""

    PART_BYTES = 8 << 20

    def __init__(self, uri: str, cfg: StorageConfig):
        self.uri, self.cfg = uri, cfg
        self._buf = bytearray()
        self._parts: list[dict] = []
        self._upload_id = None
        self._file = None
        if is_s3(uri):
            self._bucket, self._key = split_s3(uri)
            try:
                self._upload_id = s3_client(cfg).create_multipart_upload(Bucket=self._bucket, Key=self._key, **cfg.put_args())["UploadId"]
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"could not start writing {uri}: {exc}") from None
        else:
            self._path = Path(uri.removeprefix("file://")).expanduser()
            self._tmp = _temp_beside(self._path)
            self._file = self._tmp.open("wb")

    def write(self, data: bytes) -> None:
        if self._file is not None:
            self._file.write(data)
            return
        self._buf += data
        if len(self._buf) >= self.PART_BYTES:
            self._send()

    def _send(self) -> None:
        n = len(self._parts) + 1
        try:
            etag = s3_client(self.cfg).upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=n, Body=bytes(self._buf))["ETag"]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"could not write part {n} of {self.uri}: {exc}") from None
        self._parts.append({"PartNumber": n, "ETag": etag})
        self._buf.clear()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._tmp, self._path)
            return
        if self._buf or not self._parts:  # the last part may be small (or the only one, empty)
            self._send()
        try:
            s3_client(self.cfg).complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts})
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"could not finish writing {self.uri}: {exc}") from None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            return
        try:
            s3_client(self.cfg).abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
        except (ClientError, BotoCoreError):
            pass  # an upload left open is removed by the bucket's lifecycle rule, never read

    def __enter__(self) -> StreamingUpload:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()  # a failed last part or completion leaves no open upload behind
            raise


def exists(uri: str, cfg: StorageConfig) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client(cfg).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"could not check {uri}: {exc}") from None
        except BotoCoreError as exc:
            raise StorageError(f"could not check {uri}: {exc}") from None
    return Path(uri.removeprefix("file://")).expanduser().exists()


def list_objects(prefix: str, cfg: StorageConfig) -> list[str]:
    """URIs of every object (file) under `prefix`, sorted; [] when there are none."""
    if is_s3(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        out = []
        try:
            for page in s3_client(cfg).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                out.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"could not list {prefix}: {exc}") from None
        return sorted(out)
    root = Path(prefix.removeprefix("file://")).expanduser()
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def delete_objects(uris: list[str], cfg: StorageConfig) -> None:
    s3_keys: dict[str, list[str]] = {}
    for uri in uris:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_keys.setdefault(bucket, []).append(key)
        else:
            Path(uri.removeprefix("file://")).expanduser().unlink(missing_ok=True)
    for bucket, keys in s3_keys.items():
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            try:
                s3_client(cfg).delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"could not delete objects in s3://{bucket}: {exc}") from None


def redact(uri: str | None) -> str | None:
    """A URI fit for logs and records: no user:password@ and no query string (which is where
    presigned URLs carry their signature)."""
    if not uri or "://" not in uri:
        return uri
    parsed = urllib.parse.urlsplit(uri)
    netloc = parsed.hostname or ""
    if parsed.port:
        netloc += f":{parsed.port}"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, "", ""))


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key_part(value: str, max_len: int = 48) -> str:
    """A path segment derived from an untrusted value (a sku): readable, unique, and unable
    to escape its prefix. '../../x' -> 'x-<hash>'; the hash keeps distinct values distinct
    after sanitising."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    readable = _SAFE.sub("_", value).strip("._-")[:max_len] or "x"
    return f"{readable}-{digest}"
