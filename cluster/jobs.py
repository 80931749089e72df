"""Submitting a run to a Ray cluster as a Ray job, and following it.

The job's entrypoint is `skustudio run ... --address auto` (the job supervisor on the head
node sets RAY_ADDRESS, so the driver joins the cluster it runs in); its submission id is the
run id, so the Jobs API itself refuses a second submission of the same run; its runtime_env
ships the project (a working_dir upload, a container image, or a pip spec). Ray does the
scheduling and retries; nothing here distributes work.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Never uploaded with a working_dir: virtualenvs, outputs, caches, VCS data.
WORKING_DIR_EXCLUDES = [".venv", ".git", "**/__pycache__", "demo-out", "*.egg-info", ".pytest_cache", ".whl"]


class JobError(RuntimeError):
    """The Jobs API refused or could not be reached; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class ShipSpec:
    """How the cluster gets skustudio's code: exactly one of these, or none when the cluster's
    image already has skustudio installed (the recommended setup: see infra/README.md)."""

    working_dir: str | None = None
    image_uri: str | None = None
    pip: tuple[str, ...] = ()
    env_vars: tuple[tuple[str, str], ...] = ()  # never credentials: nodes use their IAM role

    def runtime_env(self) -> dict[str, Any]:
        env: dict[str, Any] = {}
        if self.working_dir:
            env["working_dir"] = str(Path(self.working_dir).resolve())
            env["excludes"] = WORKING_DIR_EXCLUDES
        if self.image_uri:
            env["image_uri"] = self.image_uri
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


def run_entrypoint(run_args: list[str], command: str = "run") -> str:
    """The shell command the job runs: `skustudio run <args>` (or `train`), joining the job's cluster."""
    args = list(run_args)
    if not any(a == "--address" or a.startswith("--address=") for a in args):
        args += ["--address", "auto"]
    return shlex.join(["skustudio", command, *args])


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection errors come in several types
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {exc}; pass the dashboard address, e.g. http://HEAD:8265") from None


def submit(address: str, run_id: str, run_args: list[str], ship: ShipSpec, metadata: dict[str, str], command: str = "run") -> str:
    """Submit a run; the run id is the submission id. Refuses a run id already submitted."""
    client = _client(address)
    try:
        existing = client.get_job_info(run_id)
    except RuntimeError:
        existing = None
    if existing is not None:
        raise JobError(
            f"run {run_id!r} was already submitted to {address} (status {existing.status}); "
            f"follow it with `skustudio jobs status {run_id} --address {address}`, or use a new --run-id"
        )
    entrypoint = run_entrypoint(run_args, command)
    log.info("submitting %s: %s", run_id, entrypoint)
    try:
        return client.submit_job(entrypoint=entrypoint, submission_id=run_id, runtime_env=ship.runtime_env() or None, metadata=metadata)
    except Exception as exc:  # noqa: BLE001
        raise JobError(f"the Jobs API at {address} refused run {run_id!r}: {exc}") from None


def status(address: str, run_id: str) -> str:
    try:
        return str(_client(address).get_job_status(run_id).value)
    except RuntimeError as exc:
        raise JobError(f"no job {run_id!r} on {address}: {exc}") from None


def logs(address: str, run_id: str) -> str:
    try:
        return _client(address).get_job_logs(run_id)
    except RuntimeError as exc:
        raise JobError(f"no job {run_id!r} on {address}: {exc}") from None


def stop(address: str, run_id: str) -> bool:
    try:
        return bool(_client(address).stop_job(run_id))
    except RuntimeError as exc:
        raise JobError(f"no job {run_id!r} on {address}: {exc}") from None


def follow(address: str, run_id: str, poll_s: float = 1.0) -> Iterator[str]:
    """Yield the job's log text as it grows, until the job ends (polling, so it works through
    proxies that cut long-lived websockets)."""
    client = _client(address)
    seen = 0
    while True:
        state = str(client.get_job_status(run_id).value)
        text = client.get_job_logs(run_id)
        if len(text) > seen:
            yield text[seen:]
            seen = len(text)
        if state in TERMINAL:
            return
        time.sleep(poll_s)
