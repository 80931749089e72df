"""One catalog regeneration run: check inputs, plan resources, execute, commit the outputs.

Output layout under OUT:
    RUN/images/<recipe>/<sku>/v<variant>-<hash>.<ext>   one object per generated variant
    RUN/rejected/<recipe>/<sku>/...                     variants that failed their recipe's gate
    RUN/variants/*.parquet        one row per (sku, recipe, variant, gate attempt); reused rows
                                  point at the image object of the run that generated them
    RUN/errors/*.parquet          one row per failed input (or input x recipe [x variant])
    RUN/_journal/aNNNN/*.parquet  rows as each batch finished, per attempt (deleted on commit):
                                  the passes after execution read the rows back from here
    RUN/_prior/aNNNN-*/shard-*    reusable rows resharded by sku, sorted, paged (deleted on commit)
    RUN/_duplicates/aNNNN-*/      a large run's near-duplicate search (deleted on commit)
    RUN/_run.json                 written last: the run is committed when it exists
    RUN/report.html               the run's story at a glance (pipelines/report.py), after commit
    _latest                       the last committed run; moves only on success

Commit protocol (see docs/operations.md): tables are written only after every row finished,
into prefixes cleared first (so a commit interrupted halfway leaves nothing a reader
accepts), then `_run.json`, then `_latest`. Rerunning the same run id finishes the work
its interrupted attempts left; rerunning a committed run id is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import importlib.metadata
import json
import logging
import re
import time
from collections import defaultdict

import numpy as np

from cluster.connect import connect
from cluster.resources import apply_data_context, plan_resources
from ops.codec import DEFAULT_MAX_PIXELS
from ops.environment import check_opencv_contrib
from ops.models import ModelError, ModelInfo
from pipelines.manifest import check_columns
from pipelines.manifest_staging import STAGED, stage_manifest
from pipelines.model_store import ModelStore
from pipelines.report import write_report
from pipelines.plan import build_dataset, find_duplicate_skus, pool_stages
from pipelines.duplicates import DUPLICATES, flag_duplicates
from pipelines.hashes import DistinctHashes, hash64_array
from pipelines.sink import ROWS_PER_FILE, dedupe_repeated_rows, write_tables
from pipelines.stages import RunContext
from pipelines.sources import DEFAULT_MAX_SOURCE_MB, DEFAULT_SOURCE_TIMEOUT_S, SourcePolicy, fetch_threads
from pipelines.state import JOURNAL, LATEST, PRIOR, RUN_RECORD, Journal, PriorState, journal_attempts, journal_rows, load_prior, recipe_fingerprint
from pipelines.storage import StorageConfig, delete_objects, exists, join, list_objects, redact, write_bytes

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunFailed(RuntimeError):
    """The run executed but must not be committed (too many failed rows); the message says
    how many, where the journal is, and how to finish it."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    manifest: str
    recipes: tuple[str, ...]
    output: str
    run_id: str = ""
    address: str | None = None
    s3_endpoint: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    cpu_batch_size: int = 4
    gpu_batch_size: int = 4
    max_gpus: float | None = None
    max_cpus: float | None = None  # CPUs an autoscaling cluster can reach: sizes the blocks (ResourcePlan.target_blocks)
    max_pixels: int = DEFAULT_MAX_PIXELS
    model_cache: str | None = None
    full: bool = False  # regenerate everything instead of reusing the last committed run
    max_error_rate: float = 0.2  # failed fraction of output rows above which nothing is committed
    trust_etag: bool = True
    sse: str | None = None  # server-side encryption of every S3 write: AES256 or aws:kms
    sse_kms_key_id: str | None = None
    # Untrusted manifests (pipelines/sources.py): where sources may come from (default: the
    # manifest's own bucket, or any local path for a local manifest), their size cap and time.
    source_prefixes: tuple[str, ...] = ()
    max_source_mb: float = DEFAULT_MAX_SOURCE_MB
    source_timeout_s: float = DEFAULT_SOURCE_TIMEOUT_S
    # Rows per committed Parquet part file: bounds the commit's object-store peak (~2 KB a row).
    part_rows: int = ROWS_PER_FILE

    def resolved_run_id(self) -> str:
        run_id = self.run_id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%dT%H%M%SZ")
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run id {run_id!r} may use only letters, digits, '.', '_' and '-' (max 128)")
        return run_id

    def record(self) -> dict:
        """The config as written to _run.json: URIs without credentials or signatures."""
        out = dataclasses.asdict(self)
        for k in ("manifest", "output", "s3_endpoint", "address"):
            out[k] = redact(out[k])
        out["recipes"] = [redact(r) for r in self.recipes]
        return out


@dataclasses.dataclass
class RunSummary:
    run_id: str
    output: str  # OUT/RUN
    inputs: int
    variants: int  # distinct (sku, recipe, variant): a variant's gate attempts count once
    passed: int
    errors: int
    errors_by_stage: dict[str, int]
    variants_by_recipe: dict[str, int]
    wall_s: float
    attempt: int = 1
    generated: int = 0  # variants made by this attempt
    reused: int = 0  # carried forward from the last committed run
    resumed: int = 0  # finished by an earlier, interrupted attempt of this run
    duplicate_rows: int = 0  # verbatim repeated manifest rows folded into one
    retried: int = 0  # extra gate attempts: rows in the variants table beyond one per variant
    report_uri: str | None = None  # RUN/report.html once written

    @property
    def rejected(self) -> int:
        """Variants whose last attempt failed the gate (their images are under rejected/)."""
        return self.variants - self.passed

    @property
    def variants_uri(self) -> str:
        return join(self.output, "variants")

    @property
    def errors_uri(self) -> str:
        return join(self.output, "errors")

    @property
    def error_rate(self) -> float:
        total = self.variants + self.errors
        return self.errors / total if total else 0.0


def run_catalog(cfg: RunConfig) -> RunSummary:
    t0 = time.perf_counter()
    run_id = cfg.resolved_run_id()
    if not 0.0 <= cfg.max_error_rate <= 1.0:
        raise ValueError(f"max_error_rate {cfg.max_error_rate} must be between 0 and 1")
    if cfg.part_rows < 1:
        raise ValueError(f"part_rows {cfg.part_rows} must be at least 1 (rows per committed Parquet file; default {ROWS_PER_FILE})")
    storage = StorageConfig.from_env(cfg.s3_endpoint, cfg.sse, cfg.sse_kms_key_id)
    output = cfg.output.rstrip("/")
    run_prefix = join(output, run_id)

    # 1. Everything that can be checked before work: the OpenCV build, not already committed,
    #    recipes load, the manifest has its columns, every model exists and fits its op.
    check_opencv_contrib()
    if exists(join(run_prefix, RUN_RECORD), storage):
        raise ValueError(f"run {run_id!r} is already committed at {redact(run_prefix)}; choose a new --run-id (nightly jobs: the date)")
    sources = SourcePolicy.for_manifest(cfg.manifest, cfg.source_prefixes, max_source_mb=cfg.max_source_mb, timeout_s=cfg.source_timeout_s)
    base = RunContext(run_id=run_id, output=output, recipe_refs=tuple(cfg.recipes), storage=storage, max_pixels=cfg.max_pixels,
                      model_cache=cfg.model_cache, sources=sources)  # fmt: skip
    recipes = base.recipes()
    if len(recipes) != len(cfg.recipes):
        raise ValueError(f"two recipes share a name: {list(cfg.recipes)}; recipe names must be unique in a run")
    columns = check_columns(cfg.manifest, storage)
    store = ModelStore(cfg.model_cache, storage)
    check_models(recipes.values(), store)
    fingerprints = tuple((name, recipe_fingerprint(r.hash, [store.identity(ref) for _, _, ref in r.model_refs()])) for name, r in recipes.items())

    # 2. Reach Ray and plan resources.
    cluster = connect(cfg.address, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    plan = plan_resources(cluster, cpu_batch_size=cfg.cpu_batch_size, gpu_batch_size=cfg.gpu_batch_size, max_gpus=cfg.max_gpus, max_cpus=cfg.max_cpus)
    apply_data_context(plan)
    # Every fetch thread may hold one source of up to the cap: plan the threads from memory.
    threads = fetch_threads(plan.fetch_memory_bytes(cluster), sources.max_bytes, plan.cpu_batch_size)
    base = dataclasses.replace(base, fetch_threads=threads)
    log.info("run %s: %s", run_id, plan.describe())
    log.info("run %s: %s; %d fetch threads per task", run_id, sources.describe(), threads)
    pools = pool_stages(list(recipes.values()))
    # Fails now, before any work, if the cluster cannot host a pool; the numbers go in _run.json.
    pool_plans = {label: plan.pool_for(steps, len(pools)) for label, steps in pools}
    for label, pool in pool_plans.items():
        log.info("run %s: %s on an actor pool of %d..%d, %.2f GPU and %.2f CPU per actor, batch %d",
                 run_id, label, pool.min_size, pool.max_size, pool.num_gpus, pool.num_cpus, pool.batch_size)  # fmt: skip

    # 3. What can be reused: earlier attempts of this run id, and the last committed run.
    attempt = max(journal_attempts(run_prefix, storage), default=0) + 1
    prior = load_prior(output, run_id, storage, attempt=attempt, full=cfg.full)
    release_finished_passes()
    if attempt > 1:
        log.info("run %s: attempt %d, finishing what earlier attempts left", run_id, attempt)
    ctx = dataclasses.replace(base, attempt=attempt, prior=prior, recipe_fingerprints=fingerprints, trust_etag=cfg.trust_etag)
    # Every pass reads the manifest in byte ranges: a CSV, Parquet or .gz one as its JSONL copy.
    manifest = stage_manifest(cfg.manifest, storage, run_prefix, columns)
    keys = find_duplicate_skus(ctx, manifest, columns, plan)
    release_finished_passes()
    duplicates = keys.duplicates
    ctx = dataclasses.replace(ctx, duplicates=duplicates)
    # Blocks sized for the catalog (a gate retry pass, over a few rows, keeps one batch a block).
    catalog_plan = plan.for_rows(keys.rows)
    log.info("run %s: %d valid manifest rows, %d rows a block", run_id, keys.rows, catalog_plan.rows_per_block)

    # 4. Execute. Workers write the images and journal each batch's metadata rows; the
    #    driver keeps none of them (bench/catalog_scale.py measures what it does hold): the passes after this
    #    read the rows back from the journal.
    produced = execute(build_dataset(ctx, manifest, columns, catalog_plan))
    release_finished_passes()
    log.info("run %s: %d rows produced, %d of them variants", run_id, produced.rows, produced.variants)
    run_gate_retries(ctx, manifest, columns, plan, rows_per_block=cfg.part_rows)
    # The rows from here on are read back from the journal, flagged as they are read. A run
    # that produced no variant (every fetch failed, say) has nothing to flag: its error rows
    # go on to the summary and the error-rate check.
    rows = flag_duplicates(Journal(ctx.run_prefix, ctx.attempt, storage, cfg.part_rows), n_variants=produced.variants)
    release_finished_passes()
    rows, folded = dedupe_repeated_rows(rows, duplicates)
    t_exec = time.perf_counter() - t0
    summary = _summarise(rows, run_id, run_prefix, time.perf_counter() - t0, attempt)  # releases its own pass
    summary.duplicate_rows = folded
    if summary.error_rate > cfg.max_error_rate:
        raise RunFailed(
            f"run {run_id}: {summary.errors} of {summary.variants + summary.errors} output rows failed "
            f"({summary.error_rate:.1%} > max_error_rate {cfg.max_error_rate:.1%}); nothing was committed. "
            f"Errors by stage: {summary.errors_by_stage}. Fix the cause and rerun with --run-id {run_id} "
            f"(finished rows are kept in {redact(join(run_prefix, JOURNAL))}), or raise --max-error-rate."
        )

    # 5. Commit: tables into cleared prefixes, then _run.json, then move _latest.
    check_sole_driver(run_id, run_prefix, attempt, storage)
    write_tables(rows, run_prefix, storage)
    release_finished_passes()
    summary.wall_s = time.perf_counter() - t0
    record = {
        "run_id": run_id,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        "attempt": attempt,
        "reused_from_run": prior.committed_run if not cfg.full else None,
        "config": {**cfg.record(), "run_id": run_id},
        "recipes": {name: {"hash": r.hash, "fingerprint": dict(fingerprints)[name], "source": redact(r.source), "ops": r.op_keys} for name, r in recipes.items()},
        "packages": _versions(),
        "resources": {**dataclasses.asdict(catalog_plan), "pools": {label: dataclasses.asdict(p) for label, p in pool_plans.items()}},
        "counts": {
            "inputs": summary.inputs,
            "variants": summary.variants,
            "passed": summary.passed,
            "rejected": summary.rejected,
            "retried": summary.retried,
            "errors": summary.errors,
            "generated": summary.generated,
            "reused": summary.reused,
            "resumed": summary.resumed,
            "duplicate_rows": summary.duplicate_rows,
            "errors_by_stage": summary.errors_by_stage,
            "variants_by_recipe": summary.variants_by_recipe,
        },
        "timings": {"execute_s": round(t_exec, 3), "total_s": round(summary.wall_s, 3)},
    }
    write_bytes(join(run_prefix, RUN_RECORD), json.dumps(record, indent=2, default=str).encode(), storage, "application/json")
    latest = {"run_id": run_id, "committed_utc": record["created_utc"]}
    write_bytes(join(output, LATEST), json.dumps(latest).encode(), storage, "application/json")
    try:  # the journal's rows are all in the committed tables now; the prior shards are spent
        delete_objects([u for sub in (JOURNAL, PRIOR, DUPLICATES, STAGED) for u in list_objects(join(run_prefix, sub), storage)], storage)
    except Exception as exc:  # noqa: BLE001 - leftovers are harmless: never read once committed
        log.warning("could not delete the journal of run %s: %s", run_id, exc)
    # 6. The report: after the commit, so it reads exactly what readers will; a report that
    #    cannot be rendered never undoes a committed run (`skustudio report` can redo it).
    try:
        summary.report_uri = write_report_on_a_worker(run_prefix, storage)
    except Exception as exc:  # noqa: BLE001
        exc = getattr(exc, "cause", None) or exc  # a Ray task's error: the report's own
        log.warning("run %s is committed, but its report could not be written (%s: %s); rerun `skustudio report %s`",
                    run_id, type(exc).__name__, exc, redact(run_prefix))  # fmt: skip
    return summary


def write_report_on_a_worker(run_prefix: str, storage: StorageConfig) -> str:
    """Render the report in a Ray task, not on the driver (a small process on the head node).
    The report streams the run's tables (pipelines/report_figures.py): ~300 MB at 1M variants,
    1.2x its 100k figure (bench/report_memory.py)."""
    import ray

    return ray.get(ray.remote(num_cpus=1, max_retries=1)(write_report).remote(run_prefix, storage))


def check_sole_driver(run_id: str, run_prefix: str, attempt: int, storage: StorageConfig) -> None:
    """Refuse to commit when another driver runs (or ran) the same run id: it committed while
    this one worked, or it started after this one (its journal attempt is newer) and will
    commit itself, having reused this attempt's journalled rows. Two drivers committing one
    prefix would replace each other's tables under readers."""
    if exists(join(run_prefix, RUN_RECORD), storage):
        raise RunFailed(f"run {run_id}: another driver committed this run id while this one was running; nothing more was written. "
                        f"Its result is at {redact(run_prefix)}; run one driver per run id (nightly: one job per date).")  # fmt: skip
    newer = sorted(a for a in journal_attempts(run_prefix, storage) if a > attempt)
    if newer:
        raise RunFailed(f"run {run_id}: another driver started this run id after this one (attempt {newer[-1]} > {attempt}) and "
                        f"will commit it, reusing the rows this one journalled; nothing was committed by this one. If that driver is "
                        f"gone too, rerun with --run-id {run_id} to commit (finished rows are reused). Run one driver per run id.")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Produced:
    rows: int  # output rows, errors included
    variants: int  # rows of kind "variant"


def release_finished_passes() -> None:
    """Free the object store of the Ray Data passes that have finished. A consumed Dataset
    sits in reference cycles (its plan and executor), so its input blocks (the descriptors
    `from_blocks` / `from_items` put in the store up front: ~0.8 KB per block of the manifest
    pass, a list of journal files per block of a journal read) stayed there until Python's
    cycle collector happened to run, and each pass's inputs were added to the next pass's.
    Called between passes: a collection costs well under a second, a pass far more."""
    gc.collect()


def execute(ds) -> Produced:
    """Run a plan to its end, keeping nothing: Finish has journalled every row (two counts per
    block are all that reach the driver)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    def count(table):
        variants = 0
        if "kind" in table.column_names:
            variants = pc.sum(pc.equal(table["kind"], "variant")).as_py() or 0
        return pa.table({"rows": [len(table)], "variants": [variants]})

    rows = variants = 0
    for b in ds.map_batches(count, batch_format="pyarrow", batch_size=None).iter_batches(batch_size=None, batch_format="numpy"):
        rows, variants = rows + int(b["rows"].sum()), variants + int(b["variants"].sum())
    return Produced(rows=rows, variants=variants)


def run_gate_retries(ctx: RunContext, manifest: str, columns: list[str], plan, rows_per_block: int = ROWS_PER_FILE) -> None:
    """Regenerate variants that failed their gate, with the next attempt's seed, until they
    pass or reach their recipe's max_attempts: one more pass over the plan per attempt, for
    just those (sku, recipe, variant)s. Every pass journals its rows; the passes after this
    read them back from the journal."""
    recipes = ctx.recipes()
    seen: set[tuple[str, str, int, int]] = set()
    while True:
        todo = [t for t in retry_set(journal_rows(ctx.run_prefix, ctx.attempt, ctx.storage, rows_per_block), recipes) if t not in seen]
        release_finished_passes()
        if not todo:
            return
        seen.update(todo)
        attempt = max(a for *_, a in todo)
        log.info("gate: regenerating %d variants that failed their gate (attempt up to %d)", len(todo), attempt)
        execute(build_dataset(dataclasses.replace(ctx, retry=tuple(sorted(todo)), prior=PriorState()), manifest, columns, plan))
        release_finished_passes()


def retry_set(rows, recipes: dict) -> list[tuple[str, str, int, int]]:
    """(sku, recipe, variant, next attempt) for each variant generated in this run whose
    latest attempt failed the gate and whose recipe allows another. Only the rows that failed
    or are retries themselves reach the driver."""
    latest: dict[tuple[str, str, int], tuple[int, bool]] = {}
    for r in rows.map_batches(_gate_outcomes, batch_format="pyarrow").take_all():
        key = (r["sku"], r["recipe"], int(r["variant"]))
        attempt = int(r["attempt"] or 1)
        if key not in latest or attempt > latest[key][0]:
            latest[key] = (attempt, bool(r["passed"]))
    return [(*key, a + 1) for key, (a, passed) in latest.items() if not passed and key[1] in recipes and recipes[key[1]].retries(a)]


def _gate_outcomes(table):
    import pyarrow.compute as pc

    variant = pc.equal(table["kind"], "variant")
    generated = pc.is_null(table["reused_from"])  # carried from a committed run: final already
    relevant = pc.or_(pc.invert(pc.fill_null(table["passed"], False)), pc.greater(pc.fill_null(table["attempt"], 1), 1))
    mask = pc.fill_null(pc.and_(pc.and_(variant, generated), relevant), False)
    return table.filter(mask).select(["sku", "recipe", "variant", "attempt", "passed"])


def check_models(recipes, store: ModelStore) -> None:
    """Every model a recipe names exists, is complete, and fits its op, checked from listings
    and small metadata files before any worker (or GPU) starts. All problems in one error."""
    problems = []
    seen: dict[str, ModelInfo | ModelError] = {}
    for recipe in recipes:
        for step, field, ref in recipe.model_refs():
            if ref not in seen:
                try:
                    seen[ref] = store.describe(ref)
                except ModelError as exc:
                    seen[ref] = exc
            found = seen[ref]
            try:
                if isinstance(found, ModelError):
                    raise found
                step.op.check_model(field, found)
            except ModelError as exc:
                problems.append(f"recipe {recipe.name!r}, op {step.op.name!r}: {exc}")
    if problems:
        raise ModelError("; ".join(dict.fromkeys(problems)))


def _summarise(rows, run_id: str, prefix: str, wall_s: float, attempt: int = 1) -> RunSummary:
    """Counts by distributed aggregation (only the small grouped results reach the driver)."""
    # Bucket counts per block, summed here: a few dozen buckets, so no shuffle is needed.
    counts: dict[str, int] = defaultdict(int)
    per_block = rows.map_batches(_bucket_counts, batch_format="pyarrow", fn_kwargs={"attempt": attempt})
    for block in per_block.iter_batches(batch_format="pyarrow", batch_size=None):
        for bucket, n in zip(block["bucket"].to_pylist(), block["rows"].to_pylist()):
            counts[bucket] += n
    del per_block  # so that its blocks can be freed
    release_finished_passes()
    variants_by_recipe: dict[str, int] = {}
    errors_by_stage: dict[str, int] = {}
    passed = input_errors = retried = 0
    origins = {"generated": 0, "reused": 0, "resumed": 0}
    for key, n in counts.items():
        kind, a, b, *rest = key.split("|")
        if kind == "variant":
            # Each retry row supersedes one earlier attempt of its variant.
            variants_by_recipe[a] = variants_by_recipe.get(a, 0) + (0 if rest[1] == "retry" else n)
            retried += n if rest[1] == "retry" else 0
            passed += n if b == "1" else 0
            origins[rest[0]] += n
        else:
            errors_by_stage[a] = errors_by_stage.get(a, 0) + n
            input_errors += n if b == "input" else 0
    # Inputs = input-level error rows + distinct manifest rows among the rest, counted from
    # 8-byte hashes of their keys (unique per block, merged here): no shuffle.
    seen = DistinctHashes()
    for block in rows.map_batches(_input_hashes, batch_format="pyarrow", fn_kwargs={"attempt": attempt}).iter_batches(batch_format="numpy", batch_size=None):
        seen.add(block["h"])
    other_inputs = seen.count()
    return RunSummary(
        run_id=run_id,
        output=prefix,
        inputs=input_errors + other_inputs,
        variants=sum(variants_by_recipe.values()),
        passed=passed,
        errors=sum(errors_by_stage.values()),
        errors_by_stage=errors_by_stage,
        variants_by_recipe=variants_by_recipe,
        wall_s=wall_s,
        attempt=attempt,
        retried=retried,
        **origins,
    )


def _bucket_counts(table, attempt: int):
    import pyarrow as pa

    counted = _count_keys(table, attempt).group_by("bucket").aggregate([("bucket", "count")])
    return pa.table({"bucket": counted["bucket"], "rows": counted["bucket_count"]})


def _input_hashes(table, attempt: int):
    import pyarrow as pa

    hashes = hash64_array(k for k in _count_keys(table, attempt)["input_key"].to_pylist() if k)
    return pa.table({"h": pa.array(np.unique(hashes), pa.uint64())})


def _count_keys(table, attempt: int):
    import pyarrow as pa

    buckets, inputs = [], []
    for kind, recipe, stage, passed, sku, src, reused_from, run_attempt, gate_attempt in zip(
        *(table[c].to_pylist() for c in ("kind", "recipe", "stage", "passed", "sku", "source_uri", "reused_from", "run_attempt", "attempt"))
    ):
        if kind == "variant":
            origin = "reused" if reused_from else ("generated" if run_attempt == attempt else "resumed")
            buckets.append(f"variant|{recipe}|{int(bool(passed))}|{origin}|{'retry' if (gate_attempt or 1) > 1 else 'first'}")
        else:
            buckets.append(f"error|{stage}|{'recipe' if recipe else 'input'}")
        inputs.append("" if kind == "error" and not recipe else f"{sku}\x00{src}")
    return pa.table({"bucket": buckets, "input_key": inputs})


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("skustudio", "ray", "torch", "diffusers", "transformers", "spandrel", "pyarrow", "boto3", "pillow", "opencv-contrib-python-headless", "scikit-image", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
