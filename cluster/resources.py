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
    # Batches run at once per actor (ops serialise their model calls, so >1 is safe); the
    # recipe's `pool: {concurrency}`, 1 by default (docs/benchmarks.md has the measurements).
    concurrency: int = 1


# Blocks a run aims for: enough for balance on the cluster it can reach, and no more, since
# each block costs the driver ~7 KB and ~16 ms and the object store one descriptor for the
# whole pass (bench/ray_blocks.py, bench/catalog_scale.py). Bounded by the cluster, not the
# catalog, so a 100k catalog holds what a 10k one does.
BLOCKS_PER_CPU = 16
MIN_TARGET_BLOCKS = 256
MAX_BLOCK_ROWS = 1024  # a task's rows at most (a lost node re-does at most this many rows a task)


@dataclasses.dataclass(frozen=True)
class ResourcePlan:
    cluster_cpus: float
    cluster_gpus: float
    cpu_batch_size: int = 4
    parse_batch_size: int = 1024
    gpu_batch_size: int = 4
    max_gpus: float | None = None  # GPUs the cluster can scale to (autoscaling); None = what it has now
    max_cpus: float | None = None  # CPUs the cluster can scale to (autoscaling); None = what it has now
    object_store_limit_bytes: int | None = None
    # Rows per block after the manifest is split (each block is one fused CPU task); 0: the CPU
    # batch. Set from the catalog's size by `for_rows`.
    block_rows: int = 0

    @property
    def target_blocks(self) -> int:
        """Blocks a catalog pass aims for: BLOCKS_PER_CPU for every CPU the cluster can reach
        (so the last wave of tasks is short), at least MIN_TARGET_BLOCKS."""
        cpus = self.max_cpus if self.max_cpus is not None else self.cluster_cpus
        return max(MIN_TARGET_BLOCKS, int(BLOCKS_PER_CPU * cpus))

    def for_rows(self, rows: int) -> ResourcePlan:
        """This plan for a catalog of `rows` manifest rows. Up to `target_blocks` blocks, each
        block is one CPU batch (the finest balance); beyond, blocks grow in whole batches up
        to MAX_BLOCK_ROWS rows, so the block count follows the cluster, not the catalog.
        Each block costs Ray Data's driver ~7 KB and ~16 ms (bench/ray_blocks.py: linear to
        40k blocks) and the object store its descriptor for the whole pass: one block per
        batch made 1,563 blocks at 100k rows (1.3 MB of store, ~11 MB of driver) and would
        make 2.5M at 10M rows and batch 4 (~17 GB of driver)."""
        batch = self.cpu_batch_size
        batches = min(-(-rows // (self.target_blocks * batch)), MAX_BLOCK_ROWS // batch)  # per block, rounded up
        return dataclasses.replace(self, block_rows=batch * max(1, batches))

    @property
    def rows_per_block(self) -> int:
        return self.block_rows or self.cpu_batch_size

    def pool_for(self, steps, pools: int = 1) -> PoolPlan:
        """Actor pool for a group of consecutive pool steps (one actor runs them all): the
        largest per-step need, the recipe's pool bounds, capped by the GPUs reachable.

        `pools` is how many GPU pools the run has. They stream concurrently, so each needs
        its actors at once: when their minimum sizes do not fit the GPUs, each actor gets a
        share of a GPU instead of the pipeline waiting forever on an actor that never starts."""
        steps = list(steps)
        names = "+".join(s.op.key for s in steps)
        gpus_each = max(s.op.resources.gpus for s in steps)
        cpus_each = max(s.op.resources.cpus for s in steps)
        spec = next((s.spec.pool for s in steps if s.spec.pool is not None), None)
        sizes = [s.spec.batch_size for s in steps if s.spec.batch_size]
        hints = [h for s in steps if (h := s.op.pool_batch_size())]
        lo, hi = (spec.min_size, spec.max_size) if spec else (1, 1)
        if gpus_each > 0:
            gpus = self.max_gpus if self.max_gpus is not None else self.cluster_gpus
            if gpus < gpus_each:
                raise ValueError(
                    f"op {names} needs {gpus_each:g} GPU per actor but the cluster has {gpus:g}; "
                    "start Ray with GPUs, or lower resources.gpus for this step"
                )
            if pools > 1 and pools * gpus_each > gpus:
                shared = gpus / pools
                log.warning("%d GPU pools on %g GPUs: %s gets %.2f GPU per actor (declared %g)", pools, gpus, names, shared, gpus_each)
                gpus_each = shared
            hi = max(1, min(hi, int(gpus // gpus_each)))
            lo = min(lo, hi)
        # Pool actors hold their CPUs for the whole run: leave at least one CPU to the CPU
        # stages (decode, cut-out, encode) that feed them, or the stream stalls.
        if pools * lo * cpus_each > max(0.0, self.cluster_cpus - 1):
            shared = max(0.1, (self.cluster_cpus - 1) / max(1, pools * lo))
            if shared < cpus_each:
                log.warning("GPU pools would hold every CPU: %s gets %.2f CPU per actor (declared %g)", names, shared, cpus_each)
                cpus_each = shared
        return PoolPlan(
            min_size=lo,
            max_size=max(lo, hi),
            num_gpus=gpus_each,
            num_cpus=cpus_each,
            batch_size=min(sizes) if sizes else min(hints) if hints else self.gpu_batch_size,
            concurrency=spec.concurrency if spec else 1,
        )

    def fetch_memory_bytes(self, cluster: dict[str, float]) -> float | None:
        """Memory one fetch-and-decode task may use: a CPU's share of the cluster's memory.
        None when Ray reports none."""
        memory = cluster.get("memory")
        if not memory or not self.cluster_cpus:
            return None
        return memory / self.cluster_cpus

    def describe(self) -> str:
        return (
            f"cluster {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU (can reach {self.max_cpus if self.max_cpus is not None else self.cluster_cpus:g} CPU / "
            f"{self.max_gpus if self.max_gpus is not None else self.cluster_gpus:g} GPU); "
            f"CPU batch {self.cpu_batch_size} ({self.rows_per_block} rows a block), "
            f"GPU batch {self.gpu_batch_size}, "
            f"object store limit {self.object_store_limit_bytes // 2**20 if self.object_store_limit_bytes else 'default'} MiB"
        )


def plan_resources(cluster: dict[str, float], *, cpu_batch_size: int = 4, gpu_batch_size: int = 4, max_gpus: float | None = None,
                   max_cpus: float | None = None, object_store_fraction: float = 0.5) -> ResourcePlan:
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
        max_cpus=max_cpus,
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
