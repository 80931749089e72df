"""Reaching Ray: start a small local instance (the embedded default) or join a cluster."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            object_store_mb: int | None = None) -> dict[str, float]:
    """Initialise Ray once per process and return `ray.cluster_resources()`.

    `address=None` starts a local Ray (no dashboard) sized to this machine; 'auto',
    'ray://host:10001' or 'host:6379' joins an existing cluster. If Ray is already
    initialised (a test session, a notebook), it is reused as is."""
    import ray

    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": bool(os.environ.get("SKUSTUDIO_WORKER_LOGS"))}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                object_store_memory=object_store_mb * 2**20 if object_store_mb else None,
                **kwargs,
            )
    return {k: float(v) for k, v in ray.cluster_resources().items()}
