"""The model store: recipe model references -> verified local copies, once per node.

    s3://models/sd15-inpaint/          a diffusers save_pretrained layout
    s3://models/esrgan/4x.safetensors  one checkpoint file
    /mnt/models/sd15                   a local path (used in place, hashed once)

S3 models are downloaded into a cache on the node's disk laid out by content hash:

    CACHE/blobs/<sha256>/...            complete copies, never modified after the rename
    CACHE/index/<listing key>.json      which blob a listing (keys, sizes, ETags) resolved to
    CACHE/locks/<listing key>.lock      flock held while one process downloads
    CACHE/tmp/                          downloads in progress (never read)

Actors on one node that ask for the same model take the same lock, so one downloads and the
others wait and then reuse the blob; a copy only becomes visible by an atomic rename after all
its files arrived with the listed sizes and were hashed, so a half-finished download (a killed
actor, a full disk) is never loaded. A changed model (new ETags or sizes) gets a new listing key
and is downloaded again; identical content from another prefix reuses the blob.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from ops.models import (
    STORE_MARKER,
    LocalModel,
    ModelError,
    ModelInfo,
    content_sha256,
    describe_files,
    describe_local,
    local_model,
)
from pipelines.storage import StorageConfig, is_s3, s3_client, split_s3

log = logging.getLogger(__name__)

DEFAULT_CACHE = "~/.cache/skustudio/models"
# A metadata file larger than this is not read during the pre-flight check.
_SMALL = 4 << 20


def default_cache_dir() -> str:
    return os.environ.get("SKUSTUDIO_MODEL_CACHE", DEFAULT_CACHE)


class ModelStore:
    def __init__(self, cache_dir: str | os.PathLike | None = None, storage: StorageConfig | None = None):
        self.cache = Path(cache_dir or default_cache_dir()).expanduser()
        self.storage = storage or StorageConfig.from_env()

    # ------------------------------------------------------------------ pre-flight (metadata)

    def describe(self, ref: str) -> ModelInfo:
        """Classify a reference from its listing and small metadata files, without weights."""
        if not is_s3(ref):
            return describe_local(ref)
        objects = self._list(ref)
        names = sorted(objects)

        def read_small(name: str) -> bytes:
            key, size, _ = objects[name]
            if size > _SMALL:
                raise ModelError(f"model {ref!r}: {name} is {size} bytes, too large for a metadata file")
            return self._get(ref, key)

        return describe_files(ref, names, read_small)

    def identity(self, ref: str) -> str:
        """A cheap identity that changes whenever the model's content does, without fetching
        weights: the listing key (names, sizes, ETags) for S3, the content hash for a local
        path. Incremental runs compare it to decide whether a variant can be reused."""
        if not is_s3(ref):
            return local_model(ref).sha256
        return _listing_key(ref, self._list(ref))

    # ------------------------------------------------------------------ fetch (weights)

    def fetch(self, ref: str) -> LocalModel:
        """A verified local copy of the model (downloaded at most once per node)."""
        if not is_s3(ref):
            return local_model(ref)
        objects = self._list(ref)
        if not objects:
            raise ModelError(f"model {ref!r} not found (no object and no objects under that prefix); check the URI or upload the model")
        key = _listing_key(ref, objects)[:32]
        for sub in ("blobs", "index", "locks", "tmp"):
            (self.cache / sub).mkdir(parents=True, exist_ok=True)
        with self._locked(key):
            found = self._indexed(key)
            if found is None:
                found = self._download(ref, objects, key)
        sha, path = found
        single = list(objects) == [""]
        return LocalModel(ref=ref, path=path / Path(split_s3(ref)[1]).name if single else path, sha256=sha)

    def _indexed(self, key: str) -> tuple[str, Path] | None:
        index = self.cache / "index" / f"{key}.json"
        try:
            sha = json.loads(index.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            return None
        blob = self.cache / "blobs" / sha
        return (sha, blob) if (blob / STORE_MARKER).is_file() else None

    def _download(self, ref: str, objects: dict[str, tuple[str, int, str]], key: str) -> tuple[str, Path]:
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.cache / "tmp"))
        try:
            total = 0
            for name, (obj_key, size, _) in objects.items():
                dest = tmp / (name or Path(obj_key).name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                self._download_file(ref, obj_key, dest)
                got = dest.stat().st_size
                if got != size:
                    raise ModelError(f"model {ref!r}: {obj_key} arrived with {got} of {size} bytes; the object changed or the transfer broke, retry")
                total += size
            sha = content_sha256(tmp)
            (tmp / STORE_MARKER).write_text(json.dumps({"ref": ref, "sha256": sha, "bytes": total, "downloaded_at": time.time()}))
            blob = self.cache / "blobs" / sha
            if (blob / STORE_MARKER).is_file():
                shutil.rmtree(tmp)  # same content already cached from another reference
            else:
                if blob.exists():  # a leftover without its marker: never trusted
                    shutil.rmtree(blob)
                os.rename(tmp, blob)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _atomic_write(self.cache / "index" / f"{key}.json", json.dumps({"ref": ref, "sha256": sha}))
        with open(self.cache / "downloads.log", "a") as fh:  # one line per real download
            fh.write(json.dumps({"ref": ref, "sha256": sha, "bytes": total, "pid": os.getpid(), "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
        log.info("model %s: downloaded %.1f MB in %.1f s -> %s", ref, total / 1e6, time.perf_counter() - t0, blob)
        return sha, blob

    @contextlib.contextmanager
    def _locked(self, key: str):
        with open(self.cache / "locks" / f"{key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ S3

    def _list(self, ref: str) -> dict[str, tuple[str, int, str]]:
        """{name relative to the reference: (key, size, etag)}; a single object is named ''."""
        bucket, key = split_s3(ref)
        client = s3_client(self.storage)
        try:
            if key and not key.endswith("/"):
                try:
                    head = client.head_object(Bucket=bucket, Key=key)
                    return {"": (key, int(head["ContentLength"]), head.get("ETag", ""))}
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                        raise
            prefix = key.rstrip("/") + "/" if key else ""
            out = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if name and not name.endswith("/"):
                        out[name] = (obj["Key"], int(obj["Size"]), obj.get("ETag", ""))
            return out
        except (ClientError, BotoCoreError) as exc:
            raise ModelError(f"model {ref!r}: cannot list it ({exc}); check the bucket name, credentials and endpoint") from None

    def _get(self, ref: str, key: str) -> bytes:
        bucket, _ = split_s3(ref)
        try:
            return s3_client(self.storage).get_object(Bucket=bucket, Key=key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise ModelError(f"model {ref!r}: cannot read {key} ({exc})") from None

    def _download_file(self, ref: str, key: str, dest: Path) -> None:
        bucket, _ = split_s3(ref)
        try:
            s3_client(self.storage).download_file(bucket, key, str(dest))
        except (ClientError, BotoCoreError) as exc:
            raise ModelError(f"model {ref!r}: download of {key} failed ({exc}); retry, or check the object") from None


def _listing_key(ref: str, objects: dict[str, tuple[str, int, str]]) -> str:
    listing = json.dumps(sorted((n, size, etag) for n, (_, size, etag) in objects.items()))
    return hashlib.sha256(f"{ref}\n{listing}".encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
