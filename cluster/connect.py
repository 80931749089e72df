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


def object_store_bytes_used() -> int:
    """Bytes in use in the cluster's object store, as `ray memory --stats-only` prints them.
    A private Ray API (the one that command uses): 0 when it fails, so a sampler only misses
    a sample."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - a missed sample only lowers the resolution
        return 0
