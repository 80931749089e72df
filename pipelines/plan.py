"""The Ray Data plan: the chain of map stages a run executes, streaming end to end.

CPU stages are plain callables (Ray runs them as tasks and fuses neighbours into one task);
op groups that declare GPUs (or an explicit pool) get their own `ActorPoolStrategy` stage,
built once per actor, so models load once per worker (when the actor starts, overlapping
the CPU stages upstream). A phased op (ops/base.py `PhasedOp`: the diffusion ops) that opens
or closes its pool group has its per-row CPU work, prepare and finish, in the CPU stages
before and after the pool, so the pool's actor only feeds the model. Rows that have no work
in a stage pass through it unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.resources import ResourcePlan
from pipelines.hashes import hash64_array
from pipelines.manifest import read_manifest, reads_in_ranges
from pipelines.recipes import Recipe, Step
from pipelines.scoring import ScoreModels, scorer_label
from pipelines.stages import FetchAndDecode, Finish, ParseRows, RunContext, RunSteps, pool_group, recipe_units, unit_label

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    label: str  # 'cpu' or 'pool:<op>@<version>:<config hash>'
    recipe: Recipe | None = None  # the recipe whose step defines a pool's resources
    step_index: int = -1


def stage_sequence(recipes: list[Recipe]) -> list[StagePlan]:
    """A shortest-ish common supersequence of every recipe's run of placement labels, so each
    recipe's steps execute in order while recipes share stages."""
    seqs = []
    for r in recipes:
        labels: list[StagePlan] = []
        for i, phase in recipe_units(r):
            label = unit_label(r, i, phase)
            if not labels or labels[-1].label != label:
                labels.append(StagePlan(label, r, i))
        seqs.append(labels)
    pos = [0] * len(seqs)
    out: list[StagePlan] = []
    while any(p < len(s) for p, s in zip(pos, seqs)):
        heads = [s[p] for p, s in zip(pos, seqs) if p < len(s)]
        counts = Counter(h.label for h in heads)
        best = max(counts, key=lambda lab: (counts[lab], lab == "cpu"))
        out.append(next(h for h in heads if h.label == best))
        pos = [p + 1 if p < len(s) and s[p].label == best else p for p, s in zip(pos, seqs)]
    return out


def pool_stages(recipes: list[Recipe]) -> list[tuple[str, list[Step]]]:
    """(label, steps) of every actor-pool stage a run has, in stream order: the GPU op groups
    of `stage_sequence`, then one scorer pool per distinct scorer config that asks for one.
    The steps carry the resources, pool bounds and batch size the pool is planned from."""
    pools = [(st.label, pool_steps(st)) for st in stage_sequence(recipes) if st.label != "cpu"]
    scorers: dict[str, list[Step]] = {}
    for r in recipes:
        label = scorer_label(r)
        if label != "cpu":
            scorers.setdefault(label, []).append(r.scorer_step)
    return pools + list(scorers.items())


def build_dataset(ctx: RunContext, manifest_uri: str, columns: list[str], plan: ResourcePlan):
    """The lazy Dataset of output rows (variant and error rows, no pixels)."""
    return build_work_rows(ctx, manifest_uri, columns, plan).map_batches(Finish(ctx), batch_format="numpy", num_cpus=1, batch_size=plan.cpu_batch_size)


def build_work_rows(ctx: RunContext, manifest_uri: str, columns: list[str], plan: ResourcePlan, manifest_filter=None):
    """The lazy Dataset of work rows after every op (pixels, mask, scores; error rows
    flowing beside them), before Finish scores and stores them. `skustudio train` reads its
    examples from here, so training sees exactly what a run's ops see. `manifest_filter`
    (a pyarrow Table -> Table function over validated manifest rows: sku, category,
    attributes as JSON, error) selects rows before anything is fetched."""
    import ray

    recipes = list(ctx.recipes().values())
    cpu = {"num_cpus": 1, "batch_size": plan.cpu_batch_size}
    only = frozenset(sku for sku, *_ in ctx.retry) if ctx.retry else None  # a gate retry pass
    # The main pass reads a JSONL manifest in byte ranges of about one block's rows, inside the
    # CPU task that fetches and decodes them (same resources: Ray Data fuses the reads, the
    # parse and the ops), so no manifest row waits in the object store for a CPU. A gate retry
    # pass wants a few skus out of the whole file: it scans larger ranges in light tasks that
    # keep only those skus' rows, so only they reach the object store, then splits them.
    ranged = bool(reads_in_ranges(manifest_uri, ctx.storage))
    fused = ranged and not ctx.retry
    parse_cpus = 1 if fused else 0.25
    # (One chunk per task: see read_manifest's `ranges_per_block`; whole blocks up to the CPU batch.)
    ds = read_manifest(manifest_uri, ctx.storage, columns, chunk_rows=(plan.rows_per_block if fused else KEY_PASS_CHUNK_ROWS) if ranged else None,
                       num_cpus=parse_cpus, ranges_per_block=plan.cpu_batch_size if fused else 1)  # fmt: skip
    parse_batch = None if ranged else plan.parse_batch_size
    ds = ds.map_batches(ParseRows([r.name for r in recipes], ctx.duplicates, only), batch_format="pyarrow", batch_size=parse_batch, num_cpus=parse_cpus)
    if manifest_filter is not None:
        ds = ds.map_batches(manifest_filter, batch_format="pyarrow", batch_size=parse_batch, num_cpus=parse_cpus)
    if not fused:
        # A manifest file read whole is one block, and Ray runs one task per block: without
        # this streaming split, a 10k-row CSV would be processed by a single task.
        ds = ds.repartition(target_num_rows_per_block=plan.rows_per_block)
    # Fetched bytes go straight into decode in the same task (threads keep the requests in
    # flight), so they never queue in the object store ahead of decoding.
    ds = ds.map_batches(FetchAndDecode(ctx), batch_format="pyarrow", **cpu)
    stages = pool_stages(recipes)
    pools = dict(stages)
    labels = [st.label for st in stage_sequence(recipes)] + [label for label in pools if label.startswith("score:")]
    for label in labels:
        if label == "cpu":
            ds = ds.map_batches(RunSteps(ctx, "cpu"), batch_format="numpy", **cpu)
            continue
        pool = plan.pool_for(pools[label], len(stages))
        log.debug("stage %s: actor pool %d..%d, %.2f GPU/actor, batch %d", label, pool.min_size, pool.max_size, pool.num_gpus, pool.batch_size)
        ds = ds.map_batches(
            ScoreModels if label.startswith("score:") else RunSteps,
            fn_constructor_args=(ctx, label),
            batch_format="numpy",
            batch_size=pool.batch_size,
            compute=ray.data.ActorPoolStrategy(
                min_size=pool.min_size,
                max_size=pool.max_size,
                max_concurrent_calls_per_actor=pool.concurrency,
                enable_true_multi_threading=pool.concurrency > 1,
            ),
            num_gpus=pool.num_gpus,
            num_cpus=pool.num_cpus,
        )
    return ds


KEY_PASS_CHUNK_ROWS = 8192  # manifest rows per task in the passes that scan it (duplicate skus, gate retries; ~2.5 MB of JSONL)


@dataclasses.dataclass(frozen=True)
class ManifestKeys:
    """What one pass over the manifest's valid rows tells the run before any image is fetched."""

    rows: int  # valid manifest rows
    duplicates: tuple[tuple[str, str, int], ...]  # (sku, image_uri kept, rows) per repeated sku


def find_duplicate_skus(ctx: RunContext, manifest_uri: str, columns: list[str], plan: ResourcePlan) -> ManifestKeys:
    """The valid rows, and (sku, image_uri to keep, rows) for every sku the manifest lists
    more than once. Workers hash each valid row's sku to 8 bytes; the driver sorts the
    hashes to find repeats (8 bytes a row, no shuffle), and only when there are some does a
    second pass bring back those skus' rows."""
    names = list(ctx.recipes())

    def parsed():
        # Byte ranges of a JSONL manifest, read, parsed and hashed in one task each.
        in_ranges = bool(reads_in_ranges(manifest_uri, ctx.storage))
        ds = read_manifest(manifest_uri, ctx.storage, columns, chunk_rows=KEY_PASS_CHUNK_ROWS if in_ranges else None)
        return ds.map_batches(ParseRows(names), batch_format="pyarrow", batch_size=None if in_ranges else plan.parse_batch_size, num_cpus=0.25)

    # 1. Hashes of the valid rows' skus; repeated hashes (a 64-bit collision only costs a look).
    chunks = [b["h"] for b in parsed().map_batches(_sku_hashes, batch_format="pyarrow", batch_size=None, num_cpus=0.25).iter_batches(batch_size=None, batch_format="numpy")]
    hashes = np.sort(np.concatenate(chunks)) if chunks else np.empty(0, np.uint64)
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    rows = len(hashes)
    del hashes, chunks
    if not len(repeated):
        return ManifestKeys(rows=rows, duplicates=())
    # 2. Only those skus' rows, grouped here.
    repeats = parsed().map_batches(_rows_with_hashes, fn_kwargs={"wanted": repeated}, batch_format="pyarrow", batch_size=None, num_cpus=0.25).take_all()
    uris: dict[str, list[str]] = {}
    for r in repeats:
        uris.setdefault(r["sku"], []).append(r["source_uri"])
    found = tuple(sorted((sku, min(u), len(u)) for sku, u in uris.items() if len(u) > 1))
    if found:
        log.warning("%d skus are listed more than once in the manifest (e.g. %r); one row each is kept", len(found), found[0][0])
    return ManifestKeys(rows=rows, duplicates=found)


def _sku_hashes(table: pa.Table) -> pa.Table:
    valid = table.filter(pc.is_null(table["error"]))
    return pa.table({"h": pa.array(hash64_array(valid["sku"].to_pylist()), pa.uint64())})


def _rows_with_hashes(table: pa.Table, wanted: np.ndarray) -> pa.Table:
    valid = table.filter(pc.is_null(table["error"])).select(["sku", "source_uri"])
    return valid.filter(pa.array(np.isin(hash64_array(valid["sku"].to_pylist()), wanted)))


def pool_steps(st: StagePlan) -> list:
    return [st.recipe.steps[i] for i in pool_group(st.recipe, st.step_index)]


