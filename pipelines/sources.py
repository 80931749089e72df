"""Which sources a manifest row may name, and how much of them a worker will read.

Catalog manifests are often written by other systems (supplier feeds, PIM exports), and the
run reads with the cluster's IAM role and node filesystem, then publishes what it made. So a
row's `image_uri` / `overlay_mask_uri` is untrusted input:

- **Allowed sources.** A URI must sit under one of the run's allowed prefixes. Default: the
  manifest's own bucket when the manifest is on S3 (local paths refused), any local path when
  the manifest is local (S3 sources need `--source-prefix`). Local paths are resolved
  (symlinks, `..`) before the check, so a link out of an allowed tree is refused.
- **Size.** An S3 object's size comes from a HEAD, a local file's from `stat`, before any byte
  is read; over `max_bytes` the source is refused. The read itself stops at `max_bytes` + 1
  (an object swapped between HEAD and GET cannot slip past).
- **Time.** Connect and read timeouts on every request, few retries, and a deadline for the
  whole source: a source that trickles bytes becomes an error row instead of holding a
  fetch thread for botocore's defaults.

Refusals raise `StorageError` subclasses named after what happened (`SourceNotAllowed`,
`SourceTooLarge`, `SourceTimeout`); the fetch stage turns them into error rows
(`stage=fetch`, `error_type=<class name>`), and nothing of the source is read.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from pipelines.storage import ObjectData, ObjectMeta, StorageConfig, StorageError, _s3_error, is_s3, split_s3

DEFAULT_MAX_SOURCE_MB = 50.0  # a real product photo is a few MB; a 50 MB one is a mistake or an attack
DEFAULT_SOURCE_TIMEOUT_S = 60.0  # the whole source: every request, retry and byte of it
_CHUNK = 1 << 20


class SourceNotAllowed(StorageError):
    """The URI is outside the run's allowed source prefixes."""


class SourceTooLarge(StorageError):
    """The source is bigger than the run's size cap."""


class SourceTimeout(StorageError):
    """The source did not arrive within the run's time limit."""


@dataclasses.dataclass(frozen=True)
class SourcePolicy:
    """Allowed source prefixes (`s3://bucket/prefix` or absolute local directories), a size cap
    and a time limit. Small and picklable: it travels to every fetch task in the RunContext."""

    prefixes: tuple[str, ...]
    max_bytes: int = int(DEFAULT_MAX_SOURCE_MB * 2**20)
    timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S

    @classmethod
    def for_manifest(cls, manifest: str, prefixes: tuple[str, ...] | list[str] = (), *, max_source_mb: float = DEFAULT_MAX_SOURCE_MB,
                     timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S) -> SourcePolicy:  # fmt: skip
        """The run's policy: the given prefixes, or the defaults for where the manifest is."""
        if max_source_mb <= 0:
            raise ValueError(f"--max-source-mb must be positive, got {max_source_mb}")
        if timeout_s <= 0:
            raise ValueError(f"--source-timeout must be positive, got {timeout_s}")
        if prefixes:
            allowed = tuple(normalise_prefix(p) for p in prefixes)
        elif is_s3(manifest):
            allowed = (f"s3://{split_s3(manifest)[0]}/",)
        else:
            allowed = ("/",)  # a local manifest was written on this machine: any local path
        return cls(prefixes=allowed, max_bytes=int(max_source_mb * 2**20), timeout_s=float(timeout_s))

    def describe(self) -> str:
        return f"sources under {', '.join(self.prefixes)}; at most {self.max_bytes / 2**20:g} MB and {self.timeout_s:g} s each"

    def check(self, uri: str) -> str:
        """The URI to read (a local path resolved), or SourceNotAllowed naming the prefixes."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            if any(part in (".", "..") for part in key.split("/")):
                raise SourceNotAllowed(f"source {uri!r} has '.' or '..' in its key; name the object by its plain key")
            target = f"s3://{bucket}/{key}"
            if any(p.startswith("s3://") and target.startswith(p) for p in self.prefixes):
                return target
        else:
            target = os.path.realpath(Path(uri.removeprefix("file://")).expanduser())
            if any(not p.startswith("s3://") and _under(target, p) for p in self.prefixes):
                return target
            if not any(not p.startswith("s3://") for p in self.prefixes):
                raise SourceNotAllowed(
                    f"source {uri!r} is a local path, and this run reads local files only under an explicitly allowed "
                    f"--source-prefix (allowed: {', '.join(self.prefixes)}); a manifest on S3 may not name node files"
                )
        raise SourceNotAllowed(
            f"source {uri!r} is outside the allowed source prefixes ({', '.join(self.prefixes)}); "
            f"add its prefix with --source-prefix if the manifest's author may read it"
        )

    def read(self, uri: str, storage: StorageConfig) -> ObjectData:
        """Check, size, then read the source within the policy's limits. Transient S3 failures
        (throttling, 5xx, a dropped connection) are retried with backoff while the source's
        time limit lasts; a stalled request is not (it already spent a third of the limit)."""
        target = self.check(uri)
        deadline = time.monotonic() + self.timeout_s
        if not is_s3(target):
            return self._read_local(target)
        return _retrying(lambda: self._read_s3(target, storage, deadline), storage, deadline)

    def head(self, uri: str, storage: StorageConfig) -> ObjectMeta:
        """ETag and size of an allowed S3 source, within the policy's time limit."""
        target = self.check(uri)
        deadline = time.monotonic() + self.timeout_s
        return _retrying(lambda: self._head_s3(target, storage), storage, deadline)

    def _head_s3(self, uri: str, storage: StorageConfig) -> ObjectMeta:
        bucket, key = split_s3(uri)
        try:
            resp = source_client(storage, self.timeout_s).head_object(Bucket=bucket, Key=key)
        except (ConnectTimeoutError, ReadTimeoutError):
            raise _timed_out(uri, self.timeout_s) from None
        except (ClientError, BotoCoreError) as exc:
            if _is_transient(exc):
                raise _Transient(_s3_error(uri, exc, "checking")) from None
            raise _s3_error(uri, exc, "checking") from None
        return ObjectMeta(resp.get("ETag", ""), int(resp["ContentLength"]))

    def _read_s3(self, uri: str, storage: StorageConfig, deadline: float) -> ObjectData:
        bucket, key = split_s3(uri)
        client = source_client(storage, self.timeout_s)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            self._check_size(uri, int(head["ContentLength"]))
            _check_deadline(uri, deadline, self.timeout_s)
            resp = client.get_object(Bucket=bucket, Key=key)
            body, chunks, n = resp["Body"], [], 0
            # A source that trickles bytes never trips the per-request read timeout: a timer
            # closes the stream at the deadline, which ends the blocked read.
            expired = threading.Event()
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: (expired.set(), body.close()))
            timer.daemon = True
            timer.start()
            try:
                while n <= self.max_bytes:
                    chunk = body.read(min(_CHUNK, self.max_bytes + 1 - n))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    n += len(chunk)
            except Exception:  # noqa: BLE001 - a read cut by the timer is a timeout; others are re-raised
                if not expired.is_set():
                    raise
            finally:
                timer.cancel()
                body.close()
            if expired.is_set():
                raise _timed_out(uri, self.timeout_s)
            self._check_size(uri, n)
            return ObjectData(b"".join(chunks), resp.get("ETag", ""))
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise SourceTimeout(f"source {uri} timed out ({type(exc).__name__}; limit {self.timeout_s:g} s per source, "
                                "--source-timeout); check the object or the network") from None  # fmt: skip
        except (ClientError, BotoCoreError) as exc:
            if _is_transient(exc):
                raise _Transient(_s3_error(uri, exc)) from None
            raise _s3_error(uri, exc) from None
        except (OSError, ValueError) as exc:  # urllib3/http.client: the connection dropped mid-body
            raise _Transient(StorageError(f"source {uri}: the connection dropped while reading ({type(exc).__name__}: {exc})")) from None

    def _read_local(self, path: str) -> ObjectData:
        try:
            size = os.stat(path).st_size
            if os.path.isdir(path):
                raise StorageError(f"{path} is a directory, not an image file")
            self._check_size(path, size)
            with open(path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise StorageError(f"no file at {path}; check the manifest's image_uri") from None
        except PermissionError:
            raise StorageError(f"permission denied reading {path}") from None
        self._check_size(path, len(data))
        return ObjectData(data)

    def _check_size(self, uri: str, size: int) -> None:
        if size > self.max_bytes:
            raise SourceTooLarge(
                f"source {uri} is {size / 2**20:.1f} MB, over the {self.max_bytes / 2**20:g} MB cap (--max-source-mb); "
                "it was not downloaded. Fix the catalog entry, or raise the cap if such photos are expected"
            )


def normalise_prefix(prefix: str) -> str:
    """`s3://bucket` -> `s3://bucket/` (so `s3://bucket-other/` never matches); local
    directories made absolute and resolved (a prefix means the tree under it)."""
    p = prefix.strip()
    if is_s3(p):
        bucket, key = split_s3(p)
        return f"s3://{bucket}/{key}"
    if "://" in p and not p.startswith("file://"):
        raise ValueError(f"source prefix {prefix!r}: only s3:// prefixes and local directories are supported")
    if not p:
        raise ValueError("an empty --source-prefix allows nothing; give s3://bucket/prefix or a directory")
    return os.path.realpath(Path(p.removeprefix("file://")).expanduser())


def _under(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def _retrying(call, storage: StorageConfig, deadline: float):
    """call() again after a transient failure, with backoff, while attempts and time last."""
    for attempt in range(1, storage.max_attempts + 1):
        try:
            return call()
        except _Transient as exc:
            pause = min(2.0, 0.1 * 2**attempt)
            if attempt == storage.max_attempts or time.monotonic() + pause > deadline:
                raise exc.error from None
            time.sleep(pause)
    raise AssertionError("unreachable: the last attempt raises")


class _Transient(Exception):
    """A failure worth another attempt; `error` is what the user sees if none is left."""

    def __init__(self, error: StorageError):
        super().__init__(str(error))
        self.error = error


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return code in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ResponseStreamingError, IncompleteReadError))


def _check_deadline(uri: str, deadline: float, timeout_s: float) -> None:
    if time.monotonic() > deadline:
        raise _timed_out(uri, timeout_s)


def _timed_out(uri: str, timeout_s: float) -> SourceTimeout:
    return SourceTimeout(f"source {uri} took longer than {timeout_s:g} s (--source-timeout); check the object or the network")


_clients: dict[tuple[StorageConfig, float], object] = {}
_clients_lock = threading.Lock()


def source_client(cfg: StorageConfig, timeout_s: float):
    """A boto3 client for untrusted sources: explicit connect/read timeouts and one attempt per
    call (SourcePolicy.read retries transient failures itself, within the source's time
    limit), so one request can never outlast that limit by much."""
    key = (cfg, timeout_s)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            per_request = max(1.0, min(20.0, timeout_s / 3))
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=cfg.endpoint_url,
                region_name=cfg.region,
                config=BotoConfig(connect_timeout=min(5.0, per_request), read_timeout=per_request,
                                  retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=32),  # fmt: skip
            )
            _clients[key] = client
        return client


def fetch_threads(memory_per_task: float | None, max_bytes: int, batch_size: int, ceiling: int = 16) -> int:
    """Threads per fetch task: every thread may hold a source of up to max_bytes, so at most
    half the task's memory share is spent on them (at least one thread, at most `ceiling`,
    and never more than the rows in a batch)."""
    by_memory = ceiling if not memory_per_task else int(0.5 * memory_per_task // max(1, max_bytes))
    return max(1, min(ceiling, batch_size, by_memory))
