"""`skustudio train`: fine-tune a diffusers model on the shop's own photos as a LoRA adapter.

    manifest rows ─ filter (category / attribute / sku list)
      ─► the run's own data path (pipelines/plan.py:build_work_rows with the `cutout` recipe:
         fetch under the source policy, decode, learned product mask)
      ─► examples: a square crop around the product at the training resolution, its mask,
         and a caption from a template over title and attributes (+ a trigger token)
      ─► Ray Train TorchTrainer (pipelines/train_loop.py), data-parallel over N workers,
         checkpoints every N steps to the training's storage
      ─► the adapter (diffusers LoRA safetensors) + training_card.json, written to the model
         store reference given as --output, where recipes' `lora:` read it.

Every check that can fail is made before any worker trains: the base model (a Stable
Diffusion text-to-image directory in the model store), the caption template, the filter
(it must select something), and every selected row (a row that cannot be fetched, decoded
or segmented is named; training refuses to start unless --skip-bad-rows).

Reruns resume: the training's name is a hash of everything that shapes the adapter (data
hash, base model identity, hyperparameters), so the same command finds its checkpoints and
Ray Train restores the latest; a changed command starts a new training.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ops.models import LORA_WEIGHTS, TRAINING_CARD, ModelError
from ops.prompts import check_template, render
from pipelines.storage import StorageConfig, arrow_filesystem, delete_objects, is_s3, join, list_objects, redact, write_bytes
from pipelines.train_loop import LORA_TARGETS, TRAIN_STATE  # light: torch is imported on the workers

log = logging.getLogger(__name__)

DEFAULT_CAPTION = "a photo of {trigger} {title}"
TRAIN_RECIPE = "cutout"  # fetch + decode + the learned product mask: what a run's ops see
_TRIGGER = re.compile(r"^[A-Za-z0-9_\-<>]{1,32}$")


class TrainDataError(ValueError):
    """The selected training data cannot be used: the message names the rows and the fix."""


class TrainFailed(RuntimeError):
    """Training stopped after Ray Train's restarts ran out; the checkpoints are kept."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    manifest: str
    base_model: str  # a diffusers text-to-image directory: local path or s3:// prefix
    output: str  # where the adapter goes (a model store reference: local dir or s3:// prefix)
    checkpoints: str | None = None  # Ray Train storage; default: OUTPUT + ".checkpoints"
    # Which manifest rows: all of the lists that are given must match (a row matches a list
    # when it matches any entry of it).
    categories: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()  # "key=value"
    skus: tuple[str, ...] = ()
    caption: str = DEFAULT_CAPTION  # {title}, {category}, {attributes}, {attributes.KEY}, {trigger}
    trigger: str = ""  # a rare token naming the product or style, e.g. "sks"
    resolution: int = 512
    rank: int = 8
    alpha: float | None = None  # LoRA alpha; default: the rank (scale 1)
    learning_rate: float = 1e-4
    steps: int = 500
    batch_size: int = 1  # per worker
    checkpoint_every: int = 100
    seed: int = 0
    background_weight: float = 1.0  # loss weight outside the product mask: 1 = plain loss, 0.1 = product identity
    prior_weight: float = 0.0  # > 0: prior preservation against the base model under class_prompt
    class_prompt: str = ""
    workers: int = 1
    use_gpu: bool | None = None  # None: GPU workers when the cluster has GPUs
    cpus_per_worker: float = 1.0
    gradient_checkpointing: bool = False
    max_failures: int = 2  # worker failures Ray Train recovers from (each resumes from a checkpoint)
    skip_bad_rows: bool = False
    address: str | None = None
    s3_endpoint: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    model_cache: str | None = None
    source_prefixes: tuple[str, ...] = ()
    fault_at_step: int | None = None  # testing: one worker exits once after this step

    def check(self) -> None:
        """ValueErrors that name the bad value, before anything is read."""
        if self.trigger and not _TRIGGER.match(self.trigger):
            raise ValueError(f"trigger {self.trigger!r} must be one token of letters, digits, '_', '-', '<', '>' (max 32)")
        check_template(self.caption.replace("{trigger}", ""), op_name="train", field="caption")
        for name, value, lo, hi in (("resolution", self.resolution, 32, 2048), ("rank", self.rank, 1, 256), ("steps", self.steps, 1, 1_000_000),
                                    ("batch_size", self.batch_size, 1, 256), ("checkpoint_every", self.checkpoint_every, 1, 1_000_000),
                                    ("workers", self.workers, 1, 1024)):  # fmt: skip
            if not lo <= value <= hi:
                raise ValueError(f"{name} {value} must be between {lo} and {hi}")
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 8 (the VAE's downsampling)")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate {self.learning_rate} must be between 0 and 1")
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"background_weight {self.background_weight} must be between 0 (product only) and 1 (plain loss)")
        if self.prior_weight < 0 or (self.prior_weight > 0 and not self.class_prompt.strip()):
            raise ValueError("prior preservation needs --class-prompt (e.g. 'a photo of a shoe') and a --prior-weight above 0")
        for a in self.attributes:
            if "=" not in a or not a.split("=", 1)[0].strip():
                raise ValueError(f"attribute filter {a!r} must be KEY=VALUE, e.g. color=red")

    def caption_for(self, row: dict[str, Any]) -> str:
        return render(self.caption.replace("{trigger}", self.trigger), row)

    def hyperparameters(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "rank": self.rank, "alpha": self.alpha or float(self.rank), "learning_rate": self.learning_rate,
                "steps": self.steps, "batch_size_per_worker": self.batch_size, "workers": self.workers, "seed": self.seed,
                "checkpoint_every": self.checkpoint_every, "background_weight": self.background_weight, "prior_weight": self.prior_weight,
                "class_prompt": self.class_prompt, "gradient_checkpointing": self.gradient_checkpointing}  # fmt: skip


@dataclasses.dataclass
class TrainSummary:
    output: str
    name: str
    examples: int
    skipped_rows: int
    steps: int
    losses: list[float]
    eval_loss_start: float
    eval_loss_end: float
    wall_s: float
    card: dict


# ------------------------------------------------------------------------------ driver


def train_adapter(cfg: TrainConfig) -> TrainSummary:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.connect import connect
    from cluster.resources import apply_data_context, plan_resources
    from pipelines.manifest import check_columns, estimated_rows
    from pipelines.manifest_staging import STAGED, stage_manifest
    from pipelines.model_store import ModelStore

    t0 = time.perf_counter()
    cfg.check()
    storage = StorageConfig.from_env(cfg.s3_endpoint)
    store = ModelStore(cfg.model_cache, storage)

    # 1. The base model, from metadata only: a Stable Diffusion text-to-image directory.
    info = store.describe(cfg.base_model)
    if info.kind != "diffusers" or info.unet_in_channels != 4:
        what = f"a {info.class_name} whose UNet takes {info.unet_in_channels} channels" if info.kind == "diffusers" else f"a {info.kind} model"
        raise ModelError(f"base model {cfg.base_model!r} is {what}; LoRA training needs a text-to-image diffusers directory "
                         "(UNet with 4 input channels, e.g. Stable Diffusion 1.5); an adapter trained on it also applies to its inpainting sibling")  # fmt: skip
    columns = check_columns(cfg.manifest, storage)

    # 2. Examples through the run's own data path; every selected row is accounted for.
    cluster = connect(cfg.address, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    plan = plan_resources(cluster)
    apply_data_context(plan)
    # Read in byte ranges like a run (a CSV, Parquet or .gz manifest through a JSONL copy next
    # to the adapter, deleted once the examples are made), in blocks sized for the manifest.
    manifest = stage_manifest(cfg.manifest, storage, cfg.output.rstrip("/"), columns)
    try:
        plan = plan.for_rows(estimated_rows(manifest, storage))
        examples, bad = _examples(cfg, storage, columns, plan, manifest)
    finally:
        delete_objects(list_objects(join(cfg.output.rstrip("/"), STAGED), storage), storage)
    n = examples.count()
    if bad and not cfg.skip_bad_rows:
        listed = "; ".join(f"{b['sku'] or '(no sku)'} at {b['stage']}: {b['error']}" for b in bad[:10])
        raise TrainDataError(f"{len(bad)} of {n + len(bad)} selected rows cannot be used ({listed}{' ...' if len(bad) > 10 else ''}); "
                             "fix them, or pass --skip-bad-rows to train on the rest")  # fmt: skip
    if n == 0:
        raise TrainDataError(f"no usable manifest rows match the filter ({_describe_filter(cfg)}) in {redact(cfg.manifest)}; check the category, attribute and sku values")
    if n < cfg.workers:
        raise TrainDataError(f"{n} examples for {cfg.workers} workers; every worker needs at least one (use --workers {n} or fewer)")
    data_sha = _data_sha256(cfg, examples)
    base_identity = store.identity(cfg.base_model)
    name = "lora-" + hashlib.sha256(json.dumps([data_sha, base_identity, cfg.caption, cfg.trigger, cfg.hyperparameters()], sort_keys=True).encode()).hexdigest()[:16]
    checkpoints = (cfg.checkpoints or cfg.output.rstrip("/") + ".checkpoints").rstrip("/")
    log.info("train %s: %d examples (%d rows skipped), %d workers, %d steps; checkpoints under %s", name, n, len(bad), cfg.workers, cfg.steps, redact(join(checkpoints, name)))

    # 3. Ray Train: every worker gets every example and keeps its own fixed slice (see
    #    train_loop.py), so batches do not depend on how a split was scheduled.
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster.get("GPU", 0) >= cfg.workers
    fs, path = arrow_filesystem(checkpoints, storage)
    loop_config = {**cfg.hyperparameters(), "base_model": cfg.base_model, "model_cache": cfg.model_cache,
                   "storage": storage, "name": name, "fault_at_step": cfg.fault_at_step, "fault_marker": join(checkpoints, name, "_fault_injected")}  # fmt: skip
    trainer = TorchTrainer(
        _loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs if is_s3(checkpoints) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": examples},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray Train's TrainingFailedError / WorkerGroupError
        first = next((line.strip() for line in str(exc).splitlines() if "Error" in line and not line.strip().startswith("File")), str(exc)[:300])
        raise TrainFailed(f"training {name} failed ({first}); Ray Train restarted it up to {cfg.max_failures} times. Checkpoints are kept under "
                          f"{redact(join(checkpoints, name))}: fix the cause and rerun the same command to resume from the last one") from exc  # fmt: skip
    if result.checkpoint is None:
        raise RuntimeError(f"training {name} ended without a checkpoint; see the Ray Train logs under {redact(join(checkpoints, name))}")

    # 4. The adapter and its card into the model store.
    with tempfile.TemporaryDirectory() as tmp:
        result.checkpoint.to_directory(tmp)
        state = json.loads((Path(tmp) / TRAIN_STATE).read_text())
        weights = (Path(tmp) / LORA_WEIGHTS).read_bytes()
    card = {
        "format": "skustudio-lora/1",
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(),
        "training": name,
        "base_model": {"ref": redact(cfg.base_model), "class_name": info.class_name, "sha256": state.get("base_sha256"), "identity": base_identity},
        "data": {"manifest": redact(cfg.manifest), "sha256": data_sha, "examples": n, "skipped_rows": len(bad), "filter": _filter_record(cfg)},
        "caption_template": cfg.caption,
        "trigger": cfg.trigger,
        "lora": {"rank": cfg.rank, "alpha": cfg.hyperparameters()["alpha"], "target_modules": LORA_TARGETS},
        **{k: v for k, v in cfg.hyperparameters().items() if k not in ("rank", "alpha")},
        "loss_curve": state["losses"],
        "eval_loss": {"start": state["eval_loss_start"], "end": state.get("eval_loss_end")},
        "wall_s": round(time.perf_counter() - t0, 2),
        "train_s": round(state["elapsed_s"], 2),
    }
    out = cfg.output.rstrip("/")
    write_bytes(join(out, LORA_WEIGHTS), weights, storage, "application/octet-stream")
    write_bytes(join(out, TRAINING_CARD), json.dumps(card, indent=2).encode(), storage, "application/json")
    log.info("train %s: adapter written to %s (eval loss %.4f -> %.4f)", name, redact(out), card["eval_loss"]["start"], card["eval_loss"]["end"])
    return TrainSummary(output=out, name=name, examples=n, skipped_rows=len(bad), steps=state["step"], losses=state["losses"],
                        eval_loss_start=state["eval_loss_start"], eval_loss_end=state.get("eval_loss_end"), wall_s=card["wall_s"], card=card)  # fmt: skip


def _loop(config):  # a module-level name Ray can pickle by reference
    from pipelines.train_loop import train_loop

    train_loop(config)


# ------------------------------------------------------------------------------ data


def _examples(cfg: TrainConfig, storage: StorageConfig, columns: list[str], plan, manifest: str):
    """(materialised Dataset of usable examples, list of bad rows) for the selected rows."""
    from pipelines.plan import build_work_rows
    from pipelines.sources import SourcePolicy
    from pipelines.stages import RunContext

    sources = SourcePolicy.for_manifest(cfg.manifest, cfg.source_prefixes)
    ctx = RunContext(run_id="train", output=cfg.output, recipe_refs=(TRAIN_RECIPE,), storage=storage, model_cache=cfg.model_cache,
                     sources=sources, recipe_fingerprints=((TRAIN_RECIPE, "train"),))  # fmt: skip
    rows = build_work_rows(ctx, manifest, columns, plan, manifest_filter=RowFilter(cfg.categories, cfg.attributes, cfg.skus))
    made = rows.map_batches(ToExamples(cfg), batch_format="numpy", batch_size=plan.cpu_batch_size).materialize()
    bad = made.filter(expr="error != ''").select_columns(["sku", "stage", "error"]).take(1000)
    good = made.filter(expr="error == ''").select_columns(["sku", "caption", "source_sha256", "image_png", "mask_png"]).materialize()
    return good, bad


class RowFilter:
    """Keeps validated manifest rows that match every given list (error rows are kept when
    no value can be judged, so a broken row in the selection is reported, not dropped)."""

    def __init__(self, categories: tuple[str, ...], attributes: tuple[str, ...], skus: tuple[str, ...]):
        self.categories = {c.strip().lower() for c in categories}
        self.attributes = [tuple(s.strip().lower() for s in a.split("=", 1)) for a in attributes]
        self.skus = set(skus)

    def __call__(self, table: pa.Table) -> pa.Table:
        keep = [self.match(r) for r in table.select(["sku", "category", "attributes", "error"]).to_pylist()]
        return table.filter(pa.array(keep, pa.bool_()))

    def match(self, r: dict) -> bool:
        if self.skus and r["sku"] not in self.skus:
            return False
        if r["error"] and not self.skus:
            return not (self.categories or self.attributes)
        if self.categories and (r["category"] or "").strip().lower() not in self.categories:
            return False
        if self.attributes:
            try:
                attrs = {str(k).lower(): str(v).strip().lower() for k, v in json.loads(r["attributes"] or "{}").items()}
            except (ValueError, AttributeError):
                return False
            if not any(attrs.get(k) == v for k, v in self.attributes):
                return False
        return True


class ToExamples:
    """Work rows (image + learned mask) -> training examples: a square crop centred on the
    product at the training resolution, its mask, and the caption; error rows carry their
    error. Images travel as PNG bytes (small, lossless)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def __call__(self, batch) -> dict:
        from pipelines.stages import _rows

        out = {k: [] for k in ("sku", "caption", "source_sha256", "image_png", "mask_png", "stage", "error")}
        for r in _rows(batch):
            image_png = mask_png = b""
            error, stage = r.get("error") or "", r.get("stage") or ""
            if not error:
                try:
                    image, mask = square_crop(r["image"], r["mask"], self.cfg.resolution)
                    image_png, mask_png = _png(image), _png(mask)
                except ValueError as exc:
                    error, stage = str(exc), "example"
            out["sku"].append(r.get("sku") or "")
            out["caption"].append(self.cfg.caption_for(r) if not error else "")
            out["source_sha256"].append(r.get("source_sha256") or "")
            out["image_png"].append(image_png)
            out["mask_png"].append(mask_png)
            out["stage"].append(stage)
            out["error"].append(error)
        return {k: np.array(v, dtype=object) for k, v in out.items()}


def square_crop(image: np.ndarray, mask: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The largest square that fits the photo, slid to centre the product's box, resized to
    side x side (area interpolation down, cubic up)."""
    import cv2

    h, w = image.shape[:2]
    if mask.shape != (h, w) or not (mask > 127).any():
        raise ValueError("no product mask for this photo (segmentation found no product); it cannot teach the product")
    s = min(h, w)
    ys, xs = np.nonzero(mask > 127)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    y0 = int(np.clip(round(cy - s / 2), 0, h - s))
    x0 = int(np.clip(round(cx - s / 2), 0, w - s))
    interp = cv2.INTER_AREA if s > side else cv2.INTER_CUBIC
    img = cv2.resize(np.ascontiguousarray(image[y0 : y0 + s, x0 : x0 + s]), (side, side), interpolation=interp)
    m = cv2.resize(np.ascontiguousarray(mask[y0 : y0 + s, x0 : x0 + s]), (side, side), interpolation=cv2.INTER_AREA)
    return img, m


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _data_sha256(cfg: TrainConfig, examples) -> str:
    """The data's identity: the manifest reference and, per example, its sku, source hash and
    caption (sorted, so row order and block layout do not matter)."""
    rows = examples.select_columns(["sku", "source_sha256", "caption"]).take_all()
    h = hashlib.sha256(redact(cfg.manifest).encode())
    for r in sorted(rows, key=lambda r: (r["sku"], r["source_sha256"])):
        h.update(f"\n{r['sku']}\x00{r['source_sha256']}\x00{r['caption']}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _filter_record(cfg: TrainConfig) -> dict:
    return {"categories": list(cfg.categories), "attributes": list(cfg.attributes), "skus": list(cfg.skus)}


def _describe_filter(cfg: TrainConfig) -> str:
    parts = [f"{k}={v}" for k, v in _filter_record(cfg).items() if v]
    return ", ".join(parts) or "no filter"
