"""The per-batch stages of a run. Each is a callable `batch -> batch` that Ray Data maps over
the stream; none of them raises for a bad row: a failing row gets `error`, `stage` and
`error_type` set and flows on untouched, so every manifest row ends as exactly one output
row (a variant, or an error).

Row lifecycle: manifest row -> ParseRows -> Fetch -> DecodeAndExpand (one row per recipe and
variant) -> RunSteps (one per placement group of ops: CPU tasks, or a GPU actor pool) ->
Finish (score, gate, encode, write the image object; drops the pixels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from ops.base import NO_MASK, Batch, Item, OpInputError, Staged, batch_of, identity_affine
from ops.compliance import Subject
from ops.compliance import evaluate as evaluate_compliance
from ops.codec import CONTENT_TYPES, DEFAULT_MAX_PIXELS, EXTENSIONS, decode_image, encode_image
from ops.overlay import OVERLAY_MASK_COLUMN
from ops.provenance import Label, can_carry_watermark, embed_watermark, watermark_id
from ops.scores import phash, quality_scores
from pipelines.manifest import normalise_row
from pipelines.model_store import ModelStore
from pipelines.recipes import Recipe, load_recipe
from pipelines.schema import FETCHED_SCHEMA, OUTPUT_SCHEMA, PARSED_SCHEMA
from pipelines.state import PriorState, attempt_dir, carried_row, journal_file_name, input_sha256, prior_rows, prior_rows_many, state_key
from pipelines.sources import SourcePolicy
from pipelines.storage import StorageConfig, StorageError, is_s3, join, safe_key_part, write_bytes

log = logging.getLogger(__name__)

EMPTY_IMAGE = np.zeros((0, 0, 3), np.uint8)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage needs to know about the run; small and picklable."""

    run_id: str
    output: str
    recipe_refs: tuple[str, ...]
    storage: StorageConfig
    max_pixels: int = DEFAULT_MAX_PIXELS
    # What manifest rows may name (prefixes, size cap, time limit): pipelines/sources.py. The
    # default here is the strictest useful one; run_catalog sets the run's own.
    sources: SourcePolicy = SourcePolicy(prefixes=())
    fetch_threads: int = 16  # planned from worker memory and the size cap (sources.fetch_threads)
    model_cache: str | None = None  # None: $SKUSTUDIO_MODEL_CACHE or ~/.cache/skustudio/models
    attempt: int = 1  # 1 for a new run; 2, 3, ... when the same run id is rerun to finish it
    prior: PriorState = PriorState()  # reusable rows (earlier attempts, last committed run)
    # (recipe name, fingerprint of its hash and model identities): part of every state key.
    recipe_fingerprints: tuple[tuple[str, str], ...] = ()
    trust_etag: bool = True  # see docs/operations.md: when an unchanged S3 ETag may skip the GET
    duplicates: tuple[tuple[str, str, int], ...] = ()  # (sku, kept image_uri, rows) for repeated skus
    # A gate retry pass: (sku, recipe, variant, attempt) to regenerate with that attempt's seed;
    # everything else in the manifest is skipped. Empty for the main pass.
    retry: tuple[tuple[str, str, int, int], ...] = ()

    def recipes(self) -> dict[str, Recipe]:
        loaded = [load_recipe(ref) for ref in self.recipe_refs]
        return {r.name: r for r in loaded}

    def fingerprint(self, recipe: str) -> str:
        return dict(self.recipe_fingerprints)[recipe]

    @property
    def run_prefix(self) -> str:
        return join(self.output, self.run_id)

    def retry_attempts(self) -> dict[tuple[str, str, int], int]:
        return {(sku, recipe, int(v)): int(a) for sku, recipe, v, a in self.retry}


_worker_ready = False
_instances: dict[str, Any] = {}  # set-up ops and scorers of this worker process


def worker_instance(key: str, op):
    """The worker process's copy of an op (or scorer), so models load once per worker. CPU
    stages run as plain Ray tasks, each handed a fresh copy of its stage object; without this
    an op with a model would load it for every batch. `key` is the recipe fingerprint (config
    and model identities) plus the step, so a changed recipe or model never reuses a copy."""
    with _setup_lock:
        return _instances.setdefault(key, op)


def ready_instance(key: str, op, store: ModelStore):
    """`worker_instance` with its models fetched from the store (once per node) and set up
    (once per worker). Raises what fetch or setup raised: the caller fails its rows."""
    op = worker_instance(key, op)
    with _setup_lock:
        if not op._ready:
            op.bind_models({field: store.fetch(ref) for field, ref in op.model_refs().items()})
        op.ensure_setup()
    return op


# Model fetch and setup happen once per worker, whichever thread of an actor gets there first.
_setup_lock = threading.Lock()


def _init_worker() -> None:
    """Once per worker process: Ray gives each task one CPU, so OpenCV's own thread pool
    would only oversubscribe the cores (Ray sets OMP_NUM_THREADS=1 but OpenCV ignores it)."""
    global _worker_ready
    if not _worker_ready:
        import cv2

        cv2.setNumThreads(1)
        _worker_ready = True


def node_id() -> str:
    """The Ray node this code runs on ('' outside Ray), recorded per row for placement checks."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001
        return ""


def _add_node(row: dict) -> None:
    row["nodes"] = json.dumps(json.loads(row.get("nodes") or "[]") + [node_id()])


def add_seconds(row: dict, label: str, seconds: float) -> None:
    """Charge worker-seconds to one op of the row's cost profile (`op_seconds`)."""
    spent = json.loads(row.get("op_seconds") or "{}")
    spent[label] = spent.get(label, 0.0) + seconds
    row["op_seconds"] = json.dumps(spent)


def derive_seed(sku: str, recipe: str, variant: int, attempt: int = 0) -> int:
    """Stable 63-bit seed: a rerun of the same (sku, recipe, variant, attempt) reproduces it."""
    digest = hashlib.sha256(f"{sku}\x00{recipe}\x00{variant}\x00{attempt}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def scorer_key(ctx: RunContext, recipe: Recipe) -> str:
    """Which worker copy of a recipe's scorers to use: its fingerprint (config, models)."""
    return f"{ctx.fingerprint(recipe.name)}:scores"


def score_context(row: dict) -> dict:
    """What a scorer's prompt template may read from a row."""
    return {k: row.get(k) for k in ("title", "category", "attributes", "segment")}


_TEXT_COLUMNS = frozenset({
    "sku", "source_uri", "title", "category", "attributes", "recipe", "segment", "source_sha256", "source_etag",
    "input_sha256", "state_key", "reuse", "notes", "models", "nodes", "source_phash", "model_scores", "op_scores", "op_seconds", "error", "stage", "error_type",
    "staged_meta",
})  # fmt: skip


def _rows(batch: Batch) -> list[dict[str, Any]]:
    """Row dicts from a numpy batch. Ray hands an all-null string column back as floats
    (NaN), so text columns are normalised to str / None here."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    rows = [{k: batch[k][i] for k in keys} for i in range(n)]
    for r in rows:
        for k in _TEXT_COLUMNS.intersection(r):
            v = r[k]
            r[k] = None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else str(v)
    return rows


def _columns(rows: list[dict[str, Any]], keys: list[str]) -> Batch:
    out: Batch = {}
    for k in keys:
        arr = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            arr[i] = r.get(k)
        out[k] = arr
    return out


def _fail(row: dict, stage: str, exc: BaseException) -> dict:
    expected = isinstance(exc, (OpInputError, StorageError, ValueError))
    if not expected:
        log.warning("unexpected %s at stage %s for sku %r", type(exc).__name__, stage, row.get("sku"), exc_info=exc)
    row.update(error=str(exc) or type(exc).__name__, stage=stage, error_type=type(exc).__name__)
    return row


# ---------------------------------------------------------------------------------- stages


class ParseRows:
    """Raw manifest rows -> validated rows (or manifest error rows).

    `duplicates` holds (sku, kept image_uri, rows) for skus listed more than once, found by a
    pass over the manifest before the run: the row with the smallest image_uri is kept and
    every row naming another image becomes an error row, so a sku never gets two sets of
    variants. Rows repeated verbatim are deduplicated when the run commits."""

    def __init__(self, recipe_names: list[str], duplicates: tuple[tuple[str, str, int], ...] = (), only_skus: frozenset[str] | None = None):
        self.recipe_names = recipe_names
        self.duplicates = {sku: (kept, n) for sku, kept, n in duplicates}
        self.only_skus = only_skus  # a gate retry pass: the skus with variants to regenerate

    def __call__(self, table):
        rows = []
        for raw in table.to_pylist():
            row = normalise_row(raw, self.recipe_names)
            if not row["error"] and row["sku"] in self.duplicates:
                kept, n = self.duplicates[row["sku"]]
                if row["source_uri"] != kept:
                    row["error"] = (
                        f"sku {row['sku']!r} is listed {n} times in the manifest with different images; kept the row "
                        f"with image_uri {kept!r} and skipped this one ({row['source_uri']!r}); give each product one row"
                    )
            if self.only_skus is not None and (row["error"] or row["sku"] not in self.only_skus):
                continue  # a retry pass: this row's outcome is already recorded by the main pass
            if row["error"]:
                row.update(stage="manifest", error_type="ManifestRowError")
            else:
                row.update(stage=None, error_type=None)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=PARSED_SCHEMA)




class Fetch:
    """Read each row's source bytes (and optional overlay mask) with a thread pool: fetching
    is I/O bound, so one CPU slot keeps many requests in flight. Hashes what it read; never
    decodes. An S3 source whose every variant the prior state holds is only HEADed when its
    ETag and size are unchanged (see `_unchanged_by_etag`)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.fan_out = {name: len(r.fan_out()) for name, r in ctx.recipes().items()}

    def __call__(self, table):
        _init_worker()
        rows = table.to_pylist()
        priors = None  # None: each row reads its own prior rows (and fails alone)
        if self.ctx.trust_etag and self.ctx.prior:
            with contextlib.suppress(StorageError):  # the batch's prior pages, read together
                priors = prior_rows_many(self.ctx.prior, [r["sku"] for r in rows if not r["error"] and is_s3(r["source_uri"])])

        def fetch(row: dict) -> None:
            row.update(source_bytes=b"", source_read=False, overlay_bytes=b"", source_sha256="", source_etag="", source_size=0, input_sha256="")
            if row["error"]:
                return
            policy = self.ctx.sources
            try:
                # Before any request: a URI outside the allowed prefixes is never touched.
                policy.check(row["source_uri"])
                if row["overlay_mask_uri"]:
                    policy.check(row["overlay_mask_uri"])
                if self._unchanged_by_etag(row, priors):
                    return
                obj = policy.read(row["source_uri"], self.ctx.storage)
                overlay = policy.read(row["overlay_mask_uri"], self.ctx.storage).data if row["overlay_mask_uri"] else b""
            except Exception as exc:  # noqa: BLE001 - every failure becomes this row's error
                _fail(row, "fetch", exc)
                return
            sha = hashlib.sha256(obj.data).hexdigest()
            overlay_sha = hashlib.sha256(overlay).hexdigest() if overlay else ""
            row.update(source_bytes=obj.data, source_read=True, overlay_bytes=overlay, source_sha256=sha, source_etag=obj.etag, source_size=len(obj.data),
                       input_sha256=input_sha256(sha, overlay_sha, row["title"], row["category"], row["attributes"]))  # fmt: skip

        with ThreadPoolExecutor(max_workers=min(self.ctx.fetch_threads, max(1, len(rows)))) as pool:
            list(pool.map(fetch, rows))
        return pa.Table.from_pylist(rows, schema=FETCHED_SCHEMA)

    def _unchanged_by_etag(self, row: dict, batch_priors: dict | None) -> bool:
        """True (and the row's hashes filled in from the prior state) when a HEAD shows the
        S3 object has the ETag and size recorded when every one of its variants was made, and
        every state key still matches: the bytes are then known without reading them."""
        uri = row["source_uri"]
        if not (self.ctx.trust_etag and self.ctx.prior and is_s3(uri)) or row["overlay_mask_uri"]:
            return False
        priors = batch_priors.get(row["sku"], {}) if batch_priors is not None else prior_rows(self.ctx.prior, row["sku"])
        wanted = [(name, v) for name in row["recipes"] for v in range(self.fan_out[name])]
        found = [priors[k][-1] if k in priors else None for k in wanted]  # each variant's last attempt
        if not found or any(p is None or p["source_uri"] != uri or not p["source_etag"] for p in found):
            return False
        if len({(p["source_etag"], p["source_size"], p["source_sha256"]) for p in found}) != 1:
            return False
        meta = self.ctx.sources.head(uri, self.ctx.storage)
        if (meta.etag, meta.size) != (found[0]["source_etag"], found[0]["source_size"]) or meta.size > self.ctx.sources.max_bytes:
            return False  # changed, or over the cap now: the read decides (and refuses)
        sha = found[0]["source_sha256"]
        ish = input_sha256(sha, "", row["title"], row["category"], row["attributes"])
        if any(p["state_key"] != state_key(ish, self.ctx.fingerprint(name)) for (name, _), p in zip(wanted, found)):
            return False
        row.update(source_sha256=sha, source_etag=meta.etag, source_size=meta.size, input_sha256=ish)
        return True


class FetchAndDecode:
    """Fetch, then DecodeAndExpand, in one task. As separate stages, Fetch (cheap, I/O) ran
    ahead of decode and parked the catalog's source bytes in the object store: Ray Data
    backpressures an operator only past half of its object-store budget, so at 10k SKUs
    every source was fetched within a minute and waited there (~3.7 KB per 128 px source;
    gigabytes for a real catalog). In one task the bytes live only while their batch is
    decoded. The fetch threads still keep many requests in flight; what a CPU slot idles
    while its batch downloads is small beside decoding and the ops (docs/benchmarks.md)."""

    def __init__(self, ctx: RunContext):
        self.fetch, self.decode = Fetch(ctx), DecodeAndExpand(ctx)

    def __call__(self, table) -> Batch:
        return self.decode(self.fetch(table))


WORK_KEYS = [
    "sku", "source_uri", "title", "category", "attributes", "recipe", "variant", "attempt", "segment", "seed", "source_sha256",
    "source_etag", "source_size", "input_sha256", "state_key", "reuse", "source_phash",
    "source", "image", "mask", "affine", "overlay_mask", "next_step", "phase", "staged_image", "staged_mask", "staged_meta",
    "duration_s", "notes", "models", "nodes", "model_scores", "op_scores", "op_seconds", "error", "stage", "error_type",
]  # fmt: skip
# `phase` is where the row is inside a phased op's step (PREPARE, MODEL, FINISH; always 0 for
# other steps) and `staged_*` carry its model input (then output) between those stages.
# `models` is a JSON list of [reference, sha256] pairs, one per model-backed step the row
# went through, `nodes` a JSON list of the Ray node ids that worked on the row (decode, each
# pool stage, finish), and `reuse` the JSON list of prior rows (one per gate attempt) this row
# carries forward ('' when the row is generated), `model_scores` the JSON scores a scorer pool
# computed (unset: Finish computes them), `op_scores` the JSON `score_*` values ops measured on
# the way (Item.scores, e.g. score_mask_confidence), `op_seconds` the JSON worker-seconds spent
# on the row per op ("decode", each op's name, "finish"): strings, so they survive Ray's numpy <-> Arrow
# conversions unchanged.


class DecodeAndExpand:
    """Decode each source once, then fan out one work row per (recipe, variant). A variant
    whose state key matches a prior row becomes a `reuse` row that skips every op; a source
    whose variants are all reusable is not decoded at all."""

    _BASE = ("sku", "source_uri", "title", "category", "attributes", "source_sha256", "source_etag", "source_size", "input_sha256", "error", "stage", "error_type")

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipes = ctx.recipes()
        self.retry = ctx.retry_attempts()

    def __call__(self, table) -> Batch:
        _init_worker()
        out = []
        rows = table.to_pylist()
        try:
            batch_priors = prior_rows_many(self.ctx.prior, [r["sku"] for r in rows if not r["error"]])
        except StorageError as exc:  # regenerating is always correct, only slower
            log.warning("prior state unreadable (%s); this batch's variants are regenerated, not reused", exc)
            batch_priors = {}
        for row in rows:
            base = {k: row.get(k) for k in self._BASE}
            base.update(recipe="", variant=-1, attempt=1, segment=None, seed=0, next_step=0, duration_s=0.0, notes="", models="[]", op_scores="{}", op_seconds="{}", state_key="", reuse="",
                        nodes=json.dumps([node_id()]), source_phash="")  # fmt: skip
            base.update(source=EMPTY_IMAGE, image=EMPTY_IMAGE, mask=NO_MASK, affine=identity_affine(), overlay_mask=NO_MASK)
            base.update(phase=WHOLE, staged_image=EMPTY_IMAGE, staged_mask=NO_MASK, staged_meta="")
            if base["error"]:
                out.append(base)
                continue
            # 1. One work row per (recipe, variant[, segment]), each with its state key; a gate
            #    retry pass makes only the variants it regenerates, with their attempt's seed.
            priors = batch_priors.get(row["sku"], {})
            work = []
            for name in row["recipes"]:
                recipe = self.recipes[name]
                for v, segment in enumerate(recipe.fan_out()):
                    attempt = self.retry.get((row["sku"], name, v), 0) if self.retry else 1
                    if not attempt:
                        continue
                    key = state_key(row["input_sha256"], self.ctx.fingerprint(name))
                    prior = priors.get((name, v))
                    reuse = prior is not None and prior[-1]["state_key"] == key
                    work.append({**base, "recipe": name, "variant": v, "attempt": attempt, "segment": segment,
                                 "seed": derive_seed(row["sku"], name, v, attempt - 1), "state_key": key,
                                 "reuse": json.dumps(prior, default=str) if reuse else "", "next_step": len(recipe.steps) if reuse else 0})  # fmt: skip
            if all(w["reuse"] for w in work):
                out.extend(work)
                continue
            # 2. Something to generate: decode once for all of this source's rows.
            t0 = time.perf_counter()
            try:
                if not row["source_read"]:
                    raise StorageError(f"source {row['source_uri']} was not read; rerun with --full")  # Fetch skips only when all reuse
                decoded = decode_image(row["source_bytes"], max_pixels=self.ctx.max_pixels)
                overlay = NO_MASK
                if row["overlay_bytes"]:
                    ov = decode_image(row["overlay_bytes"], max_pixels=self.ctx.max_pixels).image
                    overlay = (ov.max(axis=2) >= 128).astype(np.uint8) * 255
            except Exception as exc:  # noqa: BLE001
                out.append(_fail(base, "decode", exc))
                continue
            decode_s = time.perf_counter() - t0
            notes = "; ".join(decoded.notes) + ("; mask from source alpha" if decoded.alpha.size else "")
            source_phash = phash(cv2.cvtColor(decoded.image, cv2.COLOR_RGB2GRAY))
            for w in work:
                if not w["reuse"]:
                    w.update(source=decoded.image, image=decoded.image, mask=decoded.alpha, overlay_mask=overlay, duration_s=decode_s, notes=notes,
                             op_seconds=json.dumps({"decode": decode_s}),
                             source_phash=source_phash)  # fmt: skip
                out.append(w)
        return _columns(out, WORK_KEYS)


def _on_pool(step) -> bool:
    return step.op.resources.uses_gpu or step.spec.pool is not None


def pool_group(recipe: Recipe, index: int) -> range:
    """The run of consecutive pool steps (GPU ops) around step `index`. One actor pool runs
    the whole run, so a row goes scene -> outpaint -> upscale on one GPU without a trip
    through the object store between ops, and a recipe never holds several GPU pools that
    wait on each other."""
    a = b = index
    while a > 0 and _on_pool(recipe.steps[a - 1]):
        a -= 1
    while b + 1 < len(recipe.steps) and _on_pool(recipe.steps[b + 1]):
        b += 1
    return range(a, b + 1)


# A step's units of work. Most steps are one unit (WHOLE); a phased op on a pool is three:
# PREPARE and FINISH run in the CPU stages around the pool when the step opens or closes its
# pool group (inside a group of several GPU ops they stay on the actor with the row).
WHOLE = PREPARE = 0
MODEL, FINISH = 1, 2


def step_phases(recipe: Recipe, index: int) -> tuple[int, ...]:
    step = recipe.steps[index]
    return (PREPARE, MODEL, FINISH) if step.op.phased and _on_pool(step) else (WHOLE,)


def unit_label(recipe: Recipe, index: int, phase: int) -> str:
    """Where one unit (step, phase) runs: 'cpu' or the step's pool label."""
    label = step_label(recipe, index)
    if len(step_phases(recipe, index)) == 1:
        return label
    group = pool_group(recipe, index)
    if (phase == PREPARE and index == group.start) or (phase == FINISH and index == group.stop - 1):
        return "cpu"
    return label


def recipe_units(recipe: Recipe) -> list[tuple[int, int]]:
    """Every (step, phase) of a recipe, in the order a row goes through them."""
    return [(i, ph) for i in range(len(recipe.steps)) for ph in step_phases(recipe, i)]


def step_label(recipe: Recipe, index: int) -> str:
    """Where step `index` of a recipe runs: 'cpu' (fused tasks) or an actor pool named by the
    ops of its pool group and a hash of their configs (equal groups in two recipes share it)."""
    if not _on_pool(recipe.steps[index]):
        return "cpu"
    group = [recipe.steps[i] for i in pool_group(recipe, index)]
    cfg = json.dumps([[s.op.key, s.op.config.model_dump(mode="json")] for s in group], sort_keys=True)
    return f"pool:{'+'.join(s.op.name for s in group)}:{hashlib.sha256(cfg.encode()).hexdigest()[:8]}"


class RunSteps:
    """Advance each row through the consecutive steps of its recipe that run under `label`.

    Ops are called on the sub-batch of rows at the same step (so batched GPU ops see a real
    batch); if the batch call fails, each row is retried alone so one bad image fails only
    its own row. Actor pools construct this class once per actor, so `setup()` (model
    loading) happens once per worker."""

    def __init__(self, ctx: RunContext, label: str):
        self.label = label
        self.recipes = ctx.recipes()
        self.fingerprints = dict(ctx.recipe_fingerprints)
        self.store = ModelStore(ctx.model_cache, ctx.storage)
        # step_label hashes an op's config: compute it once here, not per row per pass.
        self.runs_here = {name: {u for u in recipe_units(r) if unit_label(r, *u) == label} for name, r in self.recipes.items()}
        self._setup_s: dict[str, float] = {}  # actor set-up seconds not yet charged to rows
        if label != "cpu":
            self._set_up_pool_ops()

    def _set_up_pool_ops(self) -> None:
        """A pool's actor fetches and loads its models when it starts, not on its first batch,
        so model loading (and a compiled model's warm-up) overlaps the CPU stages upstream.
        A failure is not raised here: the batch that needs the op meets it again and fails
        its rows with the error. The seconds it took are charged to the first batch's rows as
        `<op>.setup` in their `op_seconds`, so a run's cost profile shows model loading and
        compiling beside the per-row work."""
        for name, recipe in self.recipes.items():
            for k in sorted({k for k, ph in self.runs_here[name] if ph in (WHOLE, MODEL)}):
                t0 = time.perf_counter()
                try:
                    ready_instance(self._instance_key(recipe, k), recipe.steps[k].op, self.store)
                except Exception as exc:  # noqa: BLE001
                    log.warning("pool %s: setting up op %s failed at actor start: %s", self.label, recipe.steps[k].op.name, exc)
                    continue
                self._setup_s[self._instance_key(recipe, k)] = time.perf_counter() - t0

    def _instance_key(self, recipe: Recipe, k: int) -> str:
        return f"{self.fingerprints.get(recipe.name, recipe.hash)}:{k}"

    def __call__(self, batch: Batch) -> Batch:
        _init_worker()
        rows = _rows(batch)
        worked: set[int] = set()
        while True:
            # Group rows whose next unit (step, phase) runs here and run each group.
            groups: dict[tuple[str, int, int], list[int]] = {}
            for i, r in enumerate(rows):
                if r["error"] or not r["recipe"]:
                    continue
                unit = (int(r["next_step"]), int(r["phase"]))
                if unit in self.runs_here[r["recipe"]]:
                    groups.setdefault((r["recipe"], *unit), []).append(i)
            if not groups:
                break
            for (name, k, phase), idx in groups.items():
                worked.update(idx)
                recipe, group = self.recipes[name], [rows[i] for i in idx]
                if len(step_phases(recipe, k)) == 1:
                    self._run_step(recipe, k, group)
                elif phase == PREPARE:
                    self._prepare(recipe.steps[k].op, group)
                elif phase == MODEL:
                    self._run_model(recipe, k, group)
                else:
                    self._finish(recipe.steps[k].op, group)
        for i in worked:
            _add_node(rows[i])
        return _columns(rows, WORK_KEYS)

    def _ready_op(self, recipe: Recipe, k: int, rows: list[dict]):
        """The worker's set-up copy of step k's op, or None with every row failed (a broken
        model fails its rows, not the run)."""
        key = self._instance_key(recipe, k)
        try:
            op = ready_instance(key, recipe.steps[k].op, self.store)
        except Exception as exc:  # noqa: BLE001
            for r in rows:
                _fail(r, f"op:{recipe.steps[k].op.name}", exc)
            return None
        setup = self._setup_s.pop(key, None)
        if setup is not None:  # this actor's start-up, shared by the first batch it serves
            for r in rows:
                add_seconds(r, f"{op.name}.setup", setup / len(rows))
        return op

    def _run_step(self, recipe: Recipe, k: int, rows: list[dict]) -> None:
        stage = f"op:{recipe.steps[k].op.name}"
        op = self._ready_op(recipe, k, rows)
        if op is None:
            return
        # Cheap per-row checks first, so one bad row does not send its batch to the slow path.
        ok = []
        for r in rows:
            try:
                op.check_item(self._op_batch_items([r])[0])
                ok.append(r)
            except Exception as exc:  # noqa: BLE001
                _fail(r, stage, exc)
        rows = ok
        if not rows:
            return
        self._add_models(op, rows)
        t0 = time.perf_counter()
        try:
            results = op(self._op_batch(rows))
            per_row = (time.perf_counter() - t0) / len(rows)
            for i, r in enumerate(rows):
                self._take(r, results, i, per_row, op.name)
        except Exception:  # noqa: BLE001 - isolate the failing row(s)
            for r in rows:
                t1 = time.perf_counter()
                try:
                    self._take(r, op(self._op_batch([r])), 0, time.perf_counter() - t1, op.name)
                except Exception as exc:  # noqa: BLE001
                    _fail(r, stage, exc)

    @staticmethod
    def _add_models(op, rows: list[dict]) -> None:
        trail = [[ref, op.models[field].sha256] for field, ref in op.model_refs().items()]
        if trail:
            for r in rows:
                r["models"] = json.dumps(json.loads(r["models"] or "[]") + trail)

    # A phased op's three units. PREPARE and FINISH are CPU work on the op's config alone (no
    # model is fetched or loaded for them); MODEL runs on the pool's actor and only moves the
    # staged arrays through the model.

    def _prepare(self, op, rows: list[dict]) -> None:
        for r, item in zip(rows, self._op_batch_items(rows)):
            t0 = time.perf_counter()
            try:
                staged = op.prepare(item)
            except Exception as exc:  # noqa: BLE001
                _fail(r, f"op:{op.name}", exc)
                continue
            r.update(staged_image=staged.image, staged_mask=staged.mask, staged_meta=json.dumps(staged.meta), phase=MODEL)
            self._charge(r, f"{op.name}.prepare", time.perf_counter() - t0)

    def _run_model(self, recipe: Recipe, k: int, rows: list[dict]) -> None:
        stage = f"op:{recipe.steps[k].op.name}"
        op = self._ready_op(recipe, k, rows)
        if op is None:
            return
        self._add_models(op, rows)

        def staged(r: dict) -> Staged:
            return Staged(r["staged_image"], r["staged_mask"], int(r["seed"]), json.loads(r["staged_meta"]))

        t0 = time.perf_counter()
        try:
            outputs = op.run_model([staged(r) for r in rows])
            per_row = [(time.perf_counter() - t0) / len(rows)] * len(rows)
        except Exception:  # noqa: BLE001 - isolate the failing row(s)
            outputs, per_row = [], []
            for r in rows:
                t1 = time.perf_counter()
                try:
                    outputs.append(op.run_model([staged(r)])[0])
                except Exception as exc:  # noqa: BLE001
                    _fail(r, stage, exc)
                    outputs.append(None)
                per_row.append(time.perf_counter() - t1)
        for r, out, sec in zip(rows, outputs, per_row):
            if out is not None:
                r.update(staged_image=out, staged_mask=NO_MASK, phase=FINISH)
                self._charge(r, op.name, sec)

    def _finish(self, op, rows: list[dict]) -> None:
        for r, item in zip(rows, self._op_batch_items(rows)):
            t0 = time.perf_counter()
            try:
                staged = Staged(EMPTY_IMAGE, NO_MASK, int(r["seed"]), json.loads(r["staged_meta"]))
                done = op.finish(item, staged, r["staged_image"])
                r.update(staged_image=EMPTY_IMAGE, staged_mask=NO_MASK, staged_meta="", phase=WHOLE)
                self._take(r, batch_of([done], {"image": None}), 0, 0.0, op.name)
            except Exception as exc:  # noqa: BLE001
                _fail(r, f"op:{op.name}", exc)
                continue
            self._charge(r, f"{op.name}.finish", time.perf_counter() - t0)

    @staticmethod
    def _charge(row: dict, label: str, seconds: float) -> None:
        row["duration_s"] = float(row["duration_s"]) + seconds
        add_seconds(row, label, seconds)

    _CONTEXT = ("sku", "title", "category", "attributes", "segment")

    @classmethod
    def _op_batch_items(cls, rows: list[dict]) -> list[Item]:
        return [
            Item(r["image"], r["mask"], np.asarray(r["affine"], np.float64).reshape(2, 3), int(r["seed"]),
                 {**{k: r[k] for k in cls._CONTEXT}, OVERLAY_MASK_COLUMN: r["overlay_mask"]}, json.loads(r["op_scores"] or "{}"))
            for r in rows
        ]  # fmt: skip

    @classmethod
    def _op_batch(cls, rows: list[dict]) -> Batch:
        ctx_cols = {k: [r[k] for r in rows] for k in cls._CONTEXT}
        ctx_cols[OVERLAY_MASK_COLUMN] = [r["overlay_mask"] for r in rows]
        return batch_of(cls._op_batch_items(rows), {"image": None, **ctx_cols})

    @staticmethod
    def _take(row: dict, results: Batch, i: int, seconds: float, op_name: str) -> None:
        image = results["image"][i]
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.size):
            raise OpInputError(f"op returned an invalid image ({getattr(image, 'shape', type(image))})")
        row.update(image=image, mask=results["mask"][i], affine=results["affine"][i], seed=int(results["seed"][i]))
        if "scores" in results:
            row["op_scores"] = json.dumps({k: float(v) for k, v in (results["scores"][i] or {}).items()})
        row["next_step"] = int(row["next_step"]) + 1
        row["duration_s"] = float(row["duration_s"]) + seconds
        add_seconds(row, op_name, seconds)


class Finish:
    """Score, gate, encode and store each variant; emit metadata rows without pixels."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipes = ctx.recipes()
        self.store = ModelStore(ctx.model_cache, ctx.storage)

    def __call__(self, batch: Batch):
        _init_worker()
        out = []
        for r in _rows(batch):
            if r["reuse"]:
                out.extend(carried_row(p, self.ctx.run_id, r["source_uri"]) for p in json.loads(r["reuse"]))
                continue
            if not r["error"]:
                try:
                    out.append(self._finish(r))
                    continue
                except Exception as exc:  # noqa: BLE001
                    _fail(r, getattr(exc, "stage", "write"), exc)
            out.append(self._error_row(r))
        table = pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)
        if len(table):
            self._journal(table)
        return table

    def _journal(self, table: pa.Table) -> None:
        """Record finished rows under _journal/a<attempt>/ so a rerun of an interrupted run
        reuses them. Named by the rows' keys, so a retried task overwrites its own file."""
        import pyarrow.parquet as pq

        keys = sorted("\x00".join(map(str, key)) for key in zip(*(table[c].to_pylist() for c in ("kind", "sku", "recipe", "variant", "attempt"))))
        name = hashlib.sha256("\n".join(keys).encode("utf-8", "surrogatepass")).hexdigest()[:32]
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        # No try: the journal is the run's record of these rows (the commit reads them back
        # from it), so a failed write fails the task and Ray retries it.
        write_bytes(join(attempt_dir(self.ctx.run_prefix, self.ctx.attempt), journal_file_name(name, len(table))), buf.getvalue().to_pybytes(), self.ctx.storage)

    def _finish(self, r: dict) -> dict:
        recipe = self.recipes[r["recipe"]]
        t0 = time.perf_counter()
        image = r["image"]
        affine = np.asarray(r["affine"], np.float64).reshape(2, 3)
        # Generated (AI) variants are labelled in the file (IPTC/XMP) and watermarked in the
        # pixels; enhancement-only variants are neither.
        generated = any(step.op.generative for step in recipe.steps)
        wid = watermark_id(r["state_key"], r["sku"], recipe.name, int(r["variant"])) if generated and can_carry_watermark(image.shape) else None
        xmp = None
        if generated:
            image = embed_watermark(image, wid) if wid is not None else image
            xmp = Label(run_id=self.ctx.run_id, sku=r["sku"], recipe=recipe.name, variant=int(r["variant"]), watermark_id=wid).xmp()
        scores = quality_scores(image, source=r["source"], mask=r["mask"], affine=affine)
        scores.update(json.loads(r.get("op_scores") or "{}"))
        # Model scores judge the variant as the ops made it (before the invisible watermark),
        # wherever the recipe runs them: here, or already on their actor pool.
        scores.update(json.loads(r["model_scores"]) if r.get("model_scores") else self._model_scores(recipe, r))
        fmt = recipe.spec.output.pil_format
        alpha = r["mask"] if recipe.spec.output.alpha else None
        data = encode_image(image, fmt, recipe.spec.output.quality, xmp=xmp, alpha=alpha)
        scores.update(evaluate_compliance(Subject(image=image, mask=r["mask"], fmt=fmt, n_bytes=len(data), ai_generated=generated, ai_labelled=generated)))
        reasons = recipe.gate(scores)
        digest = hashlib.sha256(data).hexdigest()
        # Only variants that pass the gate are published under images/; the rest are kept
        # under rejected/ for inspection (and the report), never where a storefront reads.
        key = f"{safe_key_part(recipe.name)}/{safe_key_part(r['sku'])}/v{r['variant']}-{digest[:16]}.{EXTENSIONS[fmt]}"
        uri = join(self.ctx.output, self.ctx.run_id, "rejected" if reasons else "images", key)
        write_bytes(uri, data, self.ctx.storage, CONTENT_TYPES[fmt])
        h, w = image.shape[:2]
        models = json.loads(r["models"] or "[]")
        _add_node(r)
        finish_s = time.perf_counter() - t0
        add_seconds(r, "finish", finish_s)
        return {
            "kind": "variant",
            "run_id": self.ctx.run_id,
            "sku": r["sku"],
            "recipe": recipe.name,
            "variant": int(r["variant"]),
            "source_uri": r["source_uri"],
            "source_sha256": r["source_sha256"],
            "source_etag": r["source_etag"] or "",
            "source_size": int(r["source_size"] or 0),
            "input_sha256": r["input_sha256"],
            "state_key": r["state_key"],
            "output_uri": uri,
            "output_sha256": digest,
            "width": w,
            "height": h,
            "format": fmt,
            "segment": r["segment"],
            "seed": int(r["seed"]),
            "attempt": int(r["attempt"]),
            "model": [m[0] for m in models],
            "model_sha256": [m[1] for m in models],
            "recipe_hash": recipe.hash,
            "ops": recipe.op_keys,
            "passed": not reasons,
            "reasons": reasons,
            "notes": r["notes"] or "",
            **scores,
            "duration_s": float(r["duration_s"]) + finish_s,
            "op_seconds": json.loads(r["op_seconds"]),
            "source_phash": r["source_phash"] or None,
            "ai_generated": generated,
            "watermark_id": f"{wid:08x}" if wid is not None else None,
            "duplicate_of_variant": None,  # set at commit (pipelines/duplicates.py)
            "shared_source_skus": None,
            "reused_from": None,
            "run_attempt": self.ctx.attempt,
            "node_ids": json.loads(r["nodes"] or "[]"),
        }

    def _model_scores(self, recipe: Recipe, row: dict) -> dict[str, float]:
        """The recipe's model-based scores (BRISQUE, NIQE, CLIP, aesthetic, safety) on this CPU
        worker, models loaded once per worker; a failure fails the row at stage 'score'."""
        if not recipe.scorer.model_refs():
            return {}
        try:
            scorer = ready_instance(scorer_key(self.ctx, recipe), recipe.scorer, self.store)
            return scorer.score(row["image"], score_context(row))
        except Exception as exc:  # noqa: BLE001
            exc.stage = "score"
            raise

    def _error_row(self, r: dict) -> dict:
        return {
            "kind": "error",
            "run_id": self.ctx.run_id,
            "sku": r["sku"],
            "recipe": r["recipe"] or None,
            "variant": int(r["variant"]) if r["recipe"] and int(r["variant"]) >= 0 else None,
            "source_uri": r["source_uri"],
            "stage": r["stage"],
            "error_type": r["error_type"],
            "message": r["error"],
        }
