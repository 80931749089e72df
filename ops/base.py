"""The op contract: every image operation in skustudio is a small class built on `Op`.

An op has
- a validated config (`Op.Config`, a pydantic model; unknown fields are refused and a bad
  value raises `OpConfigError` naming the field and the value),
- a `name` and a `version` (the version goes into every output row, so bump it whenever the
  op's output for the same input changes),
- declared `resources` (cpus, gpus, memory) that the pipeline uses to place it; GPU need is
  declared here and never detected at construction,
- `setup()`, called lazily once per worker before the first batch (load models here),
- for ops with weights, `model_fields` (config fields holding model references) and
  `check_model()` (does a model of this type fit the op); the pipeline fetches each model
  through its model store and binds the local copies (`bind_models`) before `setup()`,
- a batch call, `op(batch) -> batch`, over a columnar `Batch`,
- or, for ops built around one model call (`PhasedOp`), three phases the pipeline can place
  apart: `prepare` (CPU: the model's input per row), `run_model` (tensors and the model only,
  on a GPU pool's actor) and `finish` (CPU: back to the row's geometry).

Ops never import Ray: the pipeline decides where they run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ops.models import LocalModel, ModelError, ModelInfo, describe_local, local_model


class OpConfigError(ValueError):
    """A recipe gave an op a config it cannot run with."""


class OpInputError(ValueError):
    """One row's input cannot be processed by an op (the rest of the batch can)."""


class OpConfig(BaseModel):
    """Base for op configs: immutable, strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one worker running the op needs. Fractional GPUs are allowed."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int = 512

    def __post_init__(self) -> None:
        for field in ("cpus", "gpus", "memory_mb"):
            value = getattr(self, field)
            if value < 0:
                raise OpConfigError(f"resources.{field} must be >= 0, got {value!r}")

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0


# A Batch is columnar: every value is a sequence of the same length.
# Columns ops read and write:
#   image   - HxWx3 uint8 RGB arrays
#   mask    - HxW uint8 product masks (255 = product), or an empty (0, 0) array for "none"
#   affine  - 2x3 float64 arrays mapping source pixel coords to current pixel coords
#   seed    - int64 per row
#   scores  - per-row dicts of `score_*` values an op measured on the way (e.g. remove_background's
#             score_mask_confidence); the pipeline carries them to the variant row and its gate
# plus read-only context columns (sku, title, category, attributes) that ops may use.
Batch = dict[str, Any]

NO_MASK = np.zeros((0, 0), dtype=np.uint8)


def has_mask(mask: np.ndarray | None) -> bool:
    return mask is not None and mask.size > 0


@dataclasses.dataclass
class Item:
    """One row of a batch, for ops that work image by image."""

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    seed: int
    context: dict[str, Any]
    scores: dict[str, float] = dataclasses.field(default_factory=dict)

    def with_image(self, image: np.ndarray) -> Item:
        """A copy with new pixels in the same geometry (colour and restoration ops)."""
        return dataclasses.replace(self, image=image)

    def with_mask(self, mask: np.ndarray) -> Item:
        return dataclasses.replace(self, mask=mask)

    def with_scores(self, scores: dict[str, float]) -> Item:
        """A copy that also reports these `score_*` values (later values of a name win)."""
        return dataclasses.replace(self, scores={**self.scores, **scores})

    def moved(self, image: np.ndarray, mask: np.ndarray, step: np.ndarray) -> Item:
        """A copy with new pixels after a geometric `step` (2x3 affine, old -> new coords)."""
        return dataclasses.replace(self, image=image, mask=mask, affine=chain_affines(step, self.affine))


ITEM_COLUMNS = ("image", "mask", "affine", "seed", "scores")


def batch_len(batch: Batch) -> int:
    return len(batch["image"])


def items_of(batch: Batch) -> list[Item]:
    n = batch_len(batch)
    context_cols = [k for k in batch if k not in ITEM_COLUMNS]
    out = []
    for i in range(n):
        out.append(
            Item(
                image=batch["image"][i],
                mask=batch["mask"][i] if "mask" in batch else NO_MASK,
                affine=batch["affine"][i] if "affine" in batch else identity_affine(),
                seed=int(batch["seed"][i]) if "seed" in batch else 0,
                context={k: batch[k][i] for k in context_cols},
                scores=dict(batch["scores"][i] or {}) if "scores" in batch else {},
            )
        )
    return out


def batch_of(items: list[Item], like: Batch) -> Batch:
    """Write items back into a copy of `like` (context columns are kept as they were)."""
    out = dict(like)
    out["image"] = _object_array([it.image for it in items])
    out["mask"] = _object_array([it.mask for it in items])
    out["affine"] = _object_array([it.affine for it in items])
    out["seed"] = np.asarray([it.seed for it in items], dtype=np.int64)
    out["scores"] = _object_array([it.scores for it in items])
    return out


def _object_array(values: list) -> np.ndarray:
    # np.array(list_of_arrays) would try to stack equal shapes into one tensor; keep a
    # 1-D object array so rows with different sizes can sit side by side.
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def chain_affines(*steps: np.ndarray) -> np.ndarray:
    """Compose 2x3 affines; the first argument is applied last (like matrix products)."""
    out = np.eye(3)
    for st in steps:
        out = out @ np.vstack([st, [0.0, 0.0, 1.0]])
    return out[:2]


def identity_affine() -> np.ndarray:
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclasses.dataclass
class Staged:
    """One row's model input, prepared on a CPU worker for a `PhasedOp`'s model phase. The
    pipeline carries it between stages as row columns (`staged_image`, `staged_mask`,
    `staged_meta`), so everything here is arrays and JSON-able values."""

    image: np.ndarray  # the model's input canvas (HxWx3 uint8), exactly the size it runs at
    mask: np.ndarray  # HxW uint8 on the same canvas, or NO_MASK
    seed: int
    meta: dict[str, Any]  # JSON-able: prompts, canvas size, whatever finish() needs


class Op:
    """Base class for image operations. Subclasses set `name`, `version`, `Config`."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    Config: ClassVar[type[OpConfig]] = OpConfig
    default_resources: ClassVar[Resources] = Resources()
    # True when every output depends on the row's seed (generative ops); deterministic ops
    # produce the same output for every seed, which the quality gate uses to skip retries.
    uses_seed: ClassVar[bool] = False
    # True when the op synthesises pixels (diffusion, GAN inpainting): its outputs are
    # AI-generated media for provenance and marketplace rules; enhancement ops are not.
    generative: ClassVar[bool] = False
    # Config fields that hold model references (local path or s3:// URI).
    model_fields: ClassVar[tuple[str, ...]] = ()
    # True for PhasedOp: its per-row CPU work can run in CPU stages around its model's pool.
    phased: ClassVar[bool] = False

    def __init__(self, config: Mapping[str, Any] | OpConfig | None = None, *, resources: Resources | None = None):
        self.config = self.validate_config(config)
        self.resources = resources or self.default_resources
        self.models: dict[str, LocalModel] = {}
        self._ready = False

    def pool_batch_size(self) -> int | None:
        """Rows per batch this op wants on an actor pool when the recipe step sets no
        `batch_size` (None: the run's GPU batch size)."""
        return None

    def model_refs(self) -> dict[str, str]:
        """{config field: model reference} for the models this op loads."""
        refs = {f: getattr(self.config, f) for f in self.model_fields}
        return {f: r for f, r in refs.items() if r}

    def check_model(self, field: str, info: ModelInfo) -> None:
        """Raise ModelError when a model of this type cannot serve this op (checked from
        metadata before a run starts, and again when the weights load)."""

    def bind_models(self, models: Mapping[str, LocalModel]) -> None:
        """Give the op local copies of its models (field -> LocalModel) before setup()."""
        self.models = dict(models)

    @classmethod
    def validate_config(cls, config: Mapping[str, Any] | OpConfig | None) -> OpConfig:
        if isinstance(config, cls.Config):
            return config
        try:
            return cls.Config.model_validate(dict(config or {}))
        except ValidationError as exc:
            raise OpConfigError(_describe_validation_error(cls.name, exc)) from None

    @property
    def key(self) -> str:
        """`name@version`, as recorded in output rows."""
        return f"{self.name}@{self.version}"

    def setup(self) -> None:
        """Load models and other per-worker state. Called once, lazily."""

    def ensure_setup(self) -> None:
        if not self._ready:
            for field, ref in self.model_refs().items():
                if field not in self.models:
                    # Outside the pipeline (notebooks, tests) local references load directly.
                    if ref.startswith("s3://"):
                        raise ModelError(f"model {ref!r}: s3:// models are fetched by the pipeline's model store; run the op through a recipe, or bind_models() a local copy")
                    self.check_model(field, describe_local(ref))
                    self.models[field] = local_model(ref)
            self.setup()
            self._ready = True

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        return batch_of([self.apply(item) for item in items_of(batch)], batch)

    def check_item(self, item: Item) -> None:
        """Raise OpInputError when a row cannot run (cheap checks only). The pipeline calls
        this per row before a batch call, so one bad row does not fail its batch."""

    def apply(self, item: Item) -> Item:
        """Process one row. Ops that batch natively override `__call__` instead."""
        raise NotImplementedError(f"op {self.name!r} implements neither apply() nor __call__()")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class PhasedOp(Op):
    """An op whose model call can be placed apart from its per-row CPU work, so a GPU actor
    only moves tensors and calls the model while CPU workers prepare the next batches and
    finish the last ones:

        prepare(item) -> Staged           CPU: canvas, masks, prompts (raises for a bad row)
        run_model([Staged]) -> [array]    the model: one output array per row, batched
        finish(item, staged, output)      CPU: back to the row's resolution and geometry

    Called directly (notebooks, tests, a CPU stage) the op runs the three phases in turn, so
    both paths give the same pixels."""

    phased = True

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        items = items_of(batch)
        staged = [self.prepare(item) for item in items]
        outputs = self.run_model(staged)
        return batch_of([self.finish(item, s, out) for item, s, out in zip(items, staged, outputs)], batch)

    def prepare(self, item: Item) -> Staged:
        raise NotImplementedError

    def run_model(self, staged: list[Staged]) -> list[np.ndarray]:
        raise NotImplementedError

    def finish(self, item: Item, staged: Staged, output: np.ndarray) -> Item:
        raise NotImplementedError


def _describe_validation_error(op_name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "<config>"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {field!r} (value {value!r}); check the spelling against the op's parameters")
        else:
            parts.append(f"field {field!r} = {value!r}: {err['msg']}")
    return f"op {op_name!r}: " + "; ".join(parts)
