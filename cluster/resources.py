"""Resource planning: turn the cluster's resources and the run config into task and actor
counts, pool bounds and batch sizes, and the Ray Data memory limits that keep image blocks
from outrunning the consumers and spilling."""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    min_size: int
    max_size: int
    num_gpus: float
    num_cpus: float
    batch_size: int


@dataclasses.dataclass(frozen=True)
class ResourcePlan:
    cluster_cpus: float
    cluster_gpus: float
    cpu_batch_size: int = 4
    parse_batch_size: int = 1024
    fetch_cpus: float = 0.25
    gpu_batch_size: int = 4
    max_gpus: float | None = None  # GPUs the cluster can scale to (autoscaling); None = what it has now
    object_store_limit_bytes: int | None = None

    def pool_for(self, step) -> PoolPlan:
        """Actor pool for a step: its recipe's pool bounds, capped by the GPUs reachable."""
        res = step.op.resources
        spec = step.spec.pool
        lo, hi = (spec.min_size, spec.max_size) if spec else (1, 1)
        if res.gpus > 0:
            gpus = self.max_gpus if self.max_gpus is not None else self.cluster_gpus
            if gpus < res.gpus:
                raise ValueError(
                    f"op {step.op.key} needs {res.gpus} GPU per actor but the cluster has {gpus:g}; "
                    "start Ray with GPUs, or lower resources.gpus for this step"
                )
            hi = max(1, min(hi, int(gpus // res.gpus)))
            lo = min(lo, hi)
        return PoolPlan(
            min_size=lo,
            max_size=max(lo, hi),
            num_gpus=res.gpus,
            num_cpus=res.cpus,
            batch_size=step.spec.batch_size or self.gpu_batch_size,
        )

    def describe(self) -> str:
        return (
            f"cluster {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU; CPU batch {self.cpu_batch_size}, "
            f"fetch {self.fetch_cpus:g} CPU/task, GPU batch {self.gpu_batch_size}, "
            f"object store limit {self.object_store_limit_bytes // 2**20 if self.object_store_limit_bytes else 'default'} MiB"
        )


def plan_resources(cluster: dict[str, float], *, cpu_batch_size: int = 4, gpu_batch_size: int = 4, max_gpus: float | None = None,
                   object_store_fraction: float = 0.5) -> ResourcePlan:
    """Plan from `ray.cluster_resources()`. Decoded images are large (a 2000 px RGB image is
    12 MB), so Ray Data's object store budget is capped at a fraction of the store: decode
    then backs off when downstream ops fall behind, instead of spilling to disk."""
    store = cluster.get("object_store_memory")
    return ResourcePlan(
        cluster_cpus=cluster.get("CPU", 0.0),
        cluster_gpus=cluster.get("GPU", 0.0),
        cpu_batch_size=cpu_batch_size,
        gpu_batch_size=gpu_batch_size,
        max_gpus=max_gpus,
        object_store_limit_bytes=int(store * object_store_fraction) if store else None,
    )


def apply_data_context(plan: ResourcePlan) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    if plan.object_store_limit_bytes:
        ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
            object_store_memory=plan.object_store_limit_bytes
        )
    # Per-row errors are captured in the stages; a failed block is a bug and must fail loudly.
    ctx.max_errored_blocks = 0
