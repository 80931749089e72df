"""One catalog regeneration run: check inputs, plan resources, execute, write the outputs.

Output layout under OUT/RUN:
    images/<recipe>/<sku>/v<variant>-<hash>.<ext>   one object per variant
    variants/*.parquet                               one row per (sku, recipe, variant)
    errors/*.parquet                                 one row per failed input (or input x recipe)
    _run.json                                        written last: the run is complete when it exists
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import json
import logging
import re
import time

from cluster.connect import connect
from cluster.resources import apply_data_context, plan_resources
from ops.codec import DEFAULT_MAX_PIXELS
from ops.models import ModelError, ModelInfo
from pipelines.manifest import check_columns
from pipelines.model_store import ModelStore
from pipelines.plan import build_dataset, pool_steps, select_kind, stage_sequence
from pipelines.schema import ERROR_SCHEMA, VARIANT_SCHEMA
from pipelines.stages import RunContext
from pipelines.storage import StorageConfig, arrow_filesystem, join, write_bytes

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
    max_pixels: int = DEFAULT_MAX_PIXELS
    model_cache: str | None = None

    def resolved_run_id(self) -> str:
        run_id = self.run_id or dt.datetime.now(dt.timezone.utc).strftime("run-%Y%m%dT%H%M%SZ")
        if not _RUN_ID.match(run_id):
            raise ValueError(f"run id {run_id!r} may use only letters, digits, '.', '_' and '-' (max 128)")
        return run_id


@dataclasses.dataclass
class RunSummary:
    run_id: str
    output: str  # OUT/RUN
    inputs: int
    variants: int
    passed: int
    errors: int
    errors_by_stage: dict[str, int]
    variants_by_recipe: dict[str, int]
    wall_s: float

    @property
    def variants_uri(self) -> str:
        return join(self.output, "variants")

    @property
    def errors_uri(self) -> str:
        return join(self.output, "errors")


def run_catalog(cfg: RunConfig) -> RunSummary:
    t0 = time.perf_counter()
    run_id = cfg.resolved_run_id()
    storage = StorageConfig.from_env(cfg.s3_endpoint)
    ctx = RunContext(run_id=run_id, output=cfg.output.rstrip("/"), recipe_refs=tuple(cfg.recipes), storage=storage, max_pixels=cfg.max_pixels,
                     model_cache=cfg.model_cache)

    # 1. Everything that can be checked before work: recipes load, manifest has its columns.
    recipes = ctx.recipes()
    if len(recipes) != len(cfg.recipes):
        raise ValueError(f"two recipes share a name: {list(cfg.recipes)}; recipe names must be unique in a run")
    columns = check_columns(cfg.manifest, storage)
    check_models(recipes.values(), ModelStore(cfg.model_cache, storage))

    # 2. Reach Ray and plan resources.
    cluster = connect(cfg.address, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    plan = plan_resources(cluster, cpu_batch_size=cfg.cpu_batch_size, gpu_batch_size=cfg.gpu_batch_size, max_gpus=cfg.max_gpus)
    apply_data_context(plan)
    log.info("run %s: %s", run_id, plan.describe())
    stages = [st for st in stage_sequence(list(recipes.values())) if st.label != "cpu"]
    for st in stages:
        plan.pool_for(pool_steps(st), len(stages))  # fails now, before any work, if the cluster cannot host it

    # 3. Execute. Only metadata rows (no pixels) are materialised; images were written by workers.
    run_prefix = join(ctx.output, run_id)
    rows = build_dataset(ctx, cfg.manifest, columns, plan).materialize()
    t_exec = time.perf_counter() - t0

    # 4. Sinks: split into the variants and errors tables.
    for kind, schema, sub in (("variant", VARIANT_SCHEMA, "variants"), ("error", ERROR_SCHEMA, "errors")):
        fs, path = arrow_filesystem(join(run_prefix, sub), storage)
        part = rows.map_batches(select_kind(kind, schema.names), batch_format="pyarrow")
        part.write_parquet(path, filesystem=fs, filename_provider=None, try_create_dir=True)

    summary = _summarise(rows, run_id, run_prefix, time.perf_counter() - t0)

    # 5. _run.json last: its presence marks a complete run.
    record = {
        "run_id": run_id,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": {**dataclasses.asdict(cfg), "run_id": run_id},
        "recipes": {name: {"hash": r.hash, "source": r.source, "ops": r.op_keys} for name, r in recipes.items()},
        "packages": _versions(),
        "resources": dataclasses.asdict(plan),
        "counts": {
            "inputs": summary.inputs,
            "variants": summary.variants,
            "passed": summary.passed,
            "errors": summary.errors,
            "errors_by_stage": summary.errors_by_stage,
            "variants_by_recipe": summary.variants_by_recipe,
        },
        "timings": {"execute_s": round(t_exec, 3), "total_s": round(summary.wall_s, 3)},
    }
    write_bytes(join(run_prefix, "_run.json"), json.dumps(record, indent=2, default=str).encode(), storage, "application/json")
    return summary


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


def _summarise(rows, run_id: str, prefix: str, wall_s: float) -> RunSummary:
    """Counts by distributed aggregation (only the small grouped results reach the driver)."""
    keyed = rows.map_batches(_count_keys, batch_format="pyarrow")
    counts = {r["bucket"]: r["count()"] for r in keyed.groupby("bucket", num_partitions=1).count().take_all()}
    variants_by_recipe: dict[str, int] = {}
    errors_by_stage: dict[str, int] = {}
    passed = input_errors = 0
    for key, n in counts.items():
        kind, a, b = key.split("|")
        if kind == "variant":
            variants_by_recipe[a] = variants_by_recipe.get(a, 0) + n
            passed += n if b == "1" else 0
        else:
            errors_by_stage[a] = errors_by_stage.get(a, 0) + n
            input_errors += n if b == "input" else 0
    # Inputs = input-level error rows + distinct manifest rows among the rest.
    other_inputs = keyed.filter(expr="input_key != ''").groupby("input_key", num_partitions=4).count().count()
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
    )


def _count_keys(table):
    import pyarrow as pa

    buckets, inputs = [], []
    for kind, recipe, stage, passed, sku, src in zip(
        *(table[c].to_pylist() for c in ("kind", "recipe", "stage", "passed", "sku", "source_uri"))
    ):
        if kind == "variant":
            buckets.append(f"variant|{recipe}|{int(bool(passed))}")
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
