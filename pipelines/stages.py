"""The per-batch stages of a run. Each is a callable `batch -> batch` that Ray Data maps over
the stream; none of them raises for a bad row: a failing row gets `error`, `stage` and
`error_type` set and flows on untouched, so every manifest row ends as exactly one output
row (a variant, or an error).

Row lifecycle: manifest row -> ParseRows -> Fetch -> DecodeAndExpand (one row per recipe and
variant) -> RunSteps (one per placement group of ops: CPU tasks, or a GPU actor pool) ->
Finish (score, gate, encode, write the image object; drops the pixels).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from ops.base import NO_MASK, Batch, Item, OpInputError, batch_of, identity_affine
from ops.codec import CONTENT_TYPES, DEFAULT_MAX_PIXELS, EXTENSIONS, decode_image, encode_image
from ops.overlay import OVERLAY_MASK_COLUMN
from ops.scores import quality_scores
from pipelines.manifest import normalise_row
from pipelines.model_store import ModelStore
from pipelines.recipes import Recipe, load_recipe
from pipelines.schema import FETCHED_SCHEMA, OUTPUT_SCHEMA, PARSED_SCHEMA
from pipelines.storage import StorageConfig, StorageError, join, read_bytes, safe_key_part, write_bytes

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
    fetch_threads: int = 16
    model_cache: str | None = None  # None: $SKUSTUDIO_MODEL_CACHE or ~/.cache/skustudio/models

    def recipes(self) -> dict[str, Recipe]:
        loaded = [load_recipe(ref) for ref in self.recipe_refs]
        return {r.name: r for r in loaded}


_worker_ready = False
# GPU actors run two batches at a time (see plan.py); model fetch and setup happen once.
_setup_lock = threading.Lock()


def _init_worker() -> None:
    """Once per worker process: Ray gives each task one CPU, so OpenCV's own thread pool
    would only oversubscribe the cores (Ray sets OMP_NUM_THREADS=1 but OpenCV ignores it)."""
    global _worker_ready
    if not _worker_ready:
        import cv2

        cv2.setNumThreads(1)
        _worker_ready = True


def derive_seed(sku: str, recipe: str, variant: int, attempt: int = 0) -> int:
    """Stable 63-bit seed: a rerun of the same (sku, recipe, variant, attempt) reproduces it."""
    digest = hashlib.sha256(f"{sku}\x00{recipe}\x00{variant}\x00{attempt}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_TEXT_COLUMNS = frozenset({"sku", "source_uri", "title", "category", "attributes", "recipe", "segment", "source_sha256", "notes", "models", "error", "stage", "error_type"})


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
    """Raw manifest rows -> validated rows (or manifest error rows)."""

    def __init__(self, recipe_names: list[str]):
        self.recipe_names = recipe_names

    def __call__(self, table):
        rows = []
        for raw in table.to_pylist():
            row = normalise_row(raw, self.recipe_names)
            if row["error"]:
                row.update(stage="manifest", error_type="ManifestRowError")
            else:
                row.update(stage=None, error_type=None)
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=PARSED_SCHEMA)




class Fetch:
    """Read each row's source bytes (and optional overlay mask) with a thread pool: fetching
    is I/O bound, so one CPU slot keeps many requests in flight."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx

    def __call__(self, table):
        _init_worker()
        rows = table.to_pylist()

        def fetch(row: dict) -> None:
            row.update(source_bytes=b"", overlay_bytes=b"", source_sha256="")
            if row["error"]:
                return
            try:
                data = read_bytes(row["source_uri"], self.ctx.storage)
                overlay = read_bytes(row["overlay_mask_uri"], self.ctx.storage) if row["overlay_mask_uri"] else b""
            except Exception as exc:  # noqa: BLE001 - every failure becomes this row's error
                _fail(row, "fetch", exc)
                return
            row.update(source_bytes=data, overlay_bytes=overlay, source_sha256=hashlib.sha256(data).hexdigest())

        with ThreadPoolExecutor(max_workers=min(self.ctx.fetch_threads, max(1, len(rows)))) as pool:
            list(pool.map(fetch, rows))
        return pa.Table.from_pylist(rows, schema=FETCHED_SCHEMA)


WORK_KEYS = [
    "sku", "source_uri", "title", "category", "attributes", "recipe", "variant", "segment", "seed", "source_sha256",
    "source", "image", "mask", "affine", "overlay_mask", "next_step", "duration_s", "notes", "models",
    "error", "stage", "error_type",
]  # fmt: skip
# `models` is a JSON list of [reference, sha256] pairs, one per model-backed step the row
# went through (a string, so it survives Ray's numpy <-> Arrow conversions unchanged).


class DecodeAndExpand:
    """Decode each source once, then fan out one work row per (recipe, variant)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipes = ctx.recipes()

    def __call__(self, table) -> Batch:
        _init_worker()
        out = []
        for row in table.to_pylist():
            base = {k: row.get(k) for k in ("sku", "source_uri", "title", "category", "attributes", "source_sha256", "error", "stage", "error_type")}
            base.update(recipe="", variant=-1, segment=None, seed=0, next_step=0, duration_s=0.0, notes="", models="[]")
            base.update(source=EMPTY_IMAGE, image=EMPTY_IMAGE, mask=NO_MASK, affine=identity_affine(), overlay_mask=NO_MASK)
            if base["error"]:
                out.append(base)
                continue
            t0 = time.perf_counter()
            try:
                decoded = decode_image(row["source_bytes"], max_pixels=self.ctx.max_pixels)
                overlay = NO_MASK
                if row["overlay_bytes"]:
                    ov = decode_image(row["overlay_bytes"], max_pixels=self.ctx.max_pixels).image
                    overlay = (ov.max(axis=2) >= 128).astype(np.uint8) * 255
            except Exception as exc:  # noqa: BLE001
                out.append(_fail(base, "decode", exc))
                continue
            decode_s = time.perf_counter() - t0
            for name in row["recipes"]:
                recipe = self.recipes[name]
                # One row per variant, times one per audience segment for segment recipes.
                for v, segment in enumerate(recipe.fan_out()):
                    out.append(
                        {
                            **base,
                            "recipe": name,
                            "variant": v,
                            "segment": segment,
                            "seed": derive_seed(row["sku"], name, v),
                            "source": decoded.image,
                            "image": decoded.image,
                            "mask": decoded.alpha,
                            "overlay_mask": overlay,
                            "duration_s": decode_s,
                            "notes": "; ".join(decoded.notes) + ("; mask from source alpha" if decoded.alpha.size else ""),
                        }
                    )
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
        self.store = ModelStore(ctx.model_cache, ctx.storage)
        # step_label hashes an op's config: compute it once here, not per row per pass.
        self.runs_here = {name: [step_label(r, i) == label for i in range(len(r.steps))] for name, r in self.recipes.items()}

    def __call__(self, batch: Batch) -> Batch:
        _init_worker()
        rows = _rows(batch)
        while True:
            # Group rows whose next step runs here by (recipe, step) and run each group.
            groups: dict[tuple[str, int], list[int]] = {}
            for i, r in enumerate(rows):
                if r["error"] or not r["recipe"]:
                    continue
                here = self.runs_here[r["recipe"]]
                k = int(r["next_step"])
                if k < len(here) and here[k]:
                    groups.setdefault((r["recipe"], k), []).append(i)
            if not groups:
                break
            for (name, k), idx in groups.items():
                self._run_step(self.recipes[name], k, [rows[i] for i in idx])
        return _columns(rows, WORK_KEYS)

    def _run_step(self, recipe: Recipe, k: int, rows: list[dict]) -> None:
        op = recipe.steps[k].op
        stage = f"op:{op.name}"
        try:
            with _setup_lock:
                if not op._ready:
                    # Models come from the store (downloaded once per node), then setup() loads them.
                    op.bind_models({field: self.store.fetch(ref) for field, ref in op.model_refs().items()})
                op.ensure_setup()
        except Exception as exc:  # noqa: BLE001 - a broken model fails its rows, not the run
            for r in rows:
                _fail(r, stage, exc)
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
        trail = [[ref, op.models[field].sha256] for field, ref in op.model_refs().items()]
        if trail:
            for r in rows:
                r["models"] = json.dumps(json.loads(r["models"] or "[]") + trail)
        t0 = time.perf_counter()
        try:
            results = op(self._op_batch(rows))
            per_row = (time.perf_counter() - t0) / len(rows)
            for i, r in enumerate(rows):
                self._take(r, results, i, per_row)
        except Exception:  # noqa: BLE001 - isolate the failing row(s)
            for r in rows:
                t1 = time.perf_counter()
                try:
                    self._take(r, op(self._op_batch([r])), 0, time.perf_counter() - t1)
                except Exception as exc:  # noqa: BLE001
                    _fail(r, stage, exc)

    _CONTEXT = ("sku", "title", "category", "attributes", "segment")

    @classmethod
    def _op_batch_items(cls, rows: list[dict]) -> list[Item]:
        return [
            Item(r["image"], r["mask"], np.asarray(r["affine"], np.float64).reshape(2, 3), int(r["seed"]),
                 {**{k: r[k] for k in cls._CONTEXT}, OVERLAY_MASK_COLUMN: r["overlay_mask"]})
            for r in rows
        ]  # fmt: skip

    @classmethod
    def _op_batch(cls, rows: list[dict]) -> Batch:
        ctx_cols = {k: [r[k] for r in rows] for k in cls._CONTEXT}
        ctx_cols[OVERLAY_MASK_COLUMN] = [r["overlay_mask"] for r in rows]
        return batch_of(cls._op_batch_items(rows), {"image": None, **ctx_cols})

    @staticmethod
    def _take(row: dict, results: Batch, i: int, seconds: float) -> None:
        image = results["image"][i]
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.size):
            raise OpInputError(f"op returned an invalid image ({getattr(image, 'shape', type(image))})")
        row.update(image=image, mask=results["mask"][i], affine=results["affine"][i], seed=int(results["seed"][i]))
        row["next_step"] = int(row["next_step"]) + 1
        row["duration_s"] = float(row["duration_s"]) + seconds


class Finish:
    """Score, gate, encode and store each variant; emit metadata rows without pixels."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.recipes = ctx.recipes()

    def __call__(self, batch: Batch):
        _init_worker()
        out = []
        for r in _rows(batch):
            if not r["error"]:
                try:
                    out.append(self._finish(r))
                    continue
                except Exception as exc:  # noqa: BLE001
                    _fail(r, "write", exc)
            out.append(self._error_row(r))
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _finish(self, r: dict) -> dict:
        recipe = self.recipes[r["recipe"]]
        t0 = time.perf_counter()
        image = r["image"]
        affine = np.asarray(r["affine"], np.float64).reshape(2, 3)
        scores = quality_scores(image, source=r["source"], mask=r["mask"], affine=affine)
        reasons = recipe.gate(scores)
        fmt = recipe.spec.output.pil_format
        data = encode_image(image, fmt, recipe.spec.output.quality)
        digest = hashlib.sha256(data).hexdigest()
        key = f"{safe_key_part(recipe.name)}/{safe_key_part(r['sku'])}/v{r['variant']}-{digest[:16]}.{EXTENSIONS[fmt]}"
        uri = join(self.ctx.output, self.ctx.run_id, "images", key)
        write_bytes(uri, data, self.ctx.storage, CONTENT_TYPES[fmt])
        h, w = image.shape[:2]
        models = json.loads(r["models"] or "[]")
        return {
            "kind": "variant",
            "run_id": self.ctx.run_id,
            "sku": r["sku"],
            "recipe": recipe.name,
            "variant": int(r["variant"]),
            "source_uri": r["source_uri"],
            "source_sha256": r["source_sha256"],
            "output_uri": uri,
            "output_sha256": digest,
            "width": w,
            "height": h,
            "format": fmt,
            "segment": r["segment"],
            "seed": int(r["seed"]),
            "model": [m[0] for m in models],
            "model_sha256": [m[1] for m in models],
            "recipe_hash": recipe.hash,
            "ops": recipe.op_keys,
            "passed": not reasons,
            "reasons": reasons,
            "notes": r["notes"] or "",
            **scores,
            "duration_s": float(r["duration_s"]) + (time.perf_counter() - t0),
        }

    def _error_row(self, r: dict) -> dict:
        return {
            "kind": "error",
            "run_id": self.ctx.run_id,
            "sku": r["sku"],
            "recipe": r["recipe"] or None,
            "source_uri": r["source_uri"],
            "stage": r["stage"],
            "error_type": r["error_type"],
            "message": r["error"],
        }
