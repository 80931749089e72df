"""Recipes: YAML files naming an ordered list of ops with params, the output format, how many
variants per SKU, and a gate of score thresholds.

    name: marketplace-main
    variants: 1
    output: {format: JPEG, quality: 92}
    ops:
      - op: remove_background
      - op: compose
        params: {size: 1600, fill: 0.85}
    gate:
      score_width: {min: 1600}
    max_attempts: 3   # a seeded recipe's variant failing the gate is regenerated with the next seed
    scores:           # optional model-based scores (ops/quality_models.py)
      clip: s3://models/clip-vit-l14
      safety: s3://models/sd-safety-checker
      resources: {gpus: 0.25}          # placement keys, as for a step: with GPUs or a pool the
      pool: {min_size: 1, max_size: 2} # scores run batched on their own actor pool; without,
      batch_size: 16                   # on the CPU worker that finishes the row

A recipe's hash covers every op's *validated* config (defaults included) and version, so
changing a default or bumping an op version changes the hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ops.base import Op, OpConfigError, Resources
from ops.quality_models import QualityModels
from ops.registry import op_class
from ops.compliance import compliance_columns
from ops.scores import SCORE_NAMES

BUILTIN_DIR = Path(__file__).parent / "recipes"


class RecipeError(ValueError):
    """A recipe file is missing or invalid; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourcesSpec(_Strict):
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    memory_mb: int = Field(512, ge=0)


class PoolSpec(_Strict):
    """Actor pool bounds for ops that run on actors (GPU ops)."""

    min_size: int = Field(1, ge=1)
    max_size: int = Field(1, ge=1)
    # Batches in flight per actor. With 2, the next batch's transfer and Ray's (de)serialising
    # overlap the current batch on the GPU (the model call itself is serialised per model).
    concurrency: int = Field(1, ge=1, le=4)


class StepSpec(_Strict):
    op: str
    params: dict[str, Any] = Field(default_factory=dict)
    resources: ResourcesSpec | None = None
    batch_size: int | None = Field(None, ge=1)
    pool: PoolSpec | None = None


class OutputSpec(_Strict):
    format: Literal["JPEG", "PNG", "WEBP", "jpeg", "png", "webp", "jpg", "JPG"] = "JPEG"
    quality: int = Field(92, ge=1, le=100)
    # Write the product matte as the image's alpha channel (RGBA PNG / WebP): a cutout.
    alpha: bool = False

    @model_validator(mode="after")
    def _alpha_format(self):
        if self.alpha and self.pil_format == "JPEG":
            raise ValueError(f"output.alpha needs PNG or WEBP, not format {self.format!r} (JPEG has no alpha channel)")
        return self

    @property
    def pil_format(self) -> str:
        return {"JPG": "JPEG"}.get(self.format.upper(), self.format.upper())


class Threshold(_Strict):
    min: float | None = None
    max: float | None = None


class RecipeSpec(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    variants: int = Field(1, ge=1, le=64)
    output: OutputSpec = OutputSpec()
    ops: list[StepSpec] = Field(..., min_length=1)
    gate: dict[str, Threshold] = Field(default_factory=dict)
    # Attempts per variant when the gate fails (seeded recipes only: a deterministic recipe
    # would produce the same image again, so it fails once with its reasons).
    max_attempts: int = Field(3, ge=1, le=10)
    # Model-based quality scores (ops/quality_models.py): model references, like an op's, plus
    # the placement keys of a step (SCORE_PLACEMENT_KEYS).
    scores: dict[str, Any] = Field(default_factory=dict)

    @field_validator("gate")
    @classmethod
    def _gate_names(cls, gate):
        for key in gate:
            if key in compliance_columns():
                continue
            if key not in SCORE_NAMES:
                raise ValueError(f"gate on unknown score {key!r}; known: {', '.join(SCORE_NAMES)} and compliance_<channel>[_<rule>] columns")
        return gate


# Keys of `scores:` that say where the scorers run (as for a step), not what they compute.
SCORE_PLACEMENT_KEYS = ("resources", "pool", "batch_size")


@dataclasses.dataclass(frozen=True)
class Step:
    spec: StepSpec
    op: Op


class Recipe:
    """A loaded recipe: its spec, its ops (constructed and validated, not yet set up), its hash."""

    def __init__(self, spec: RecipeSpec, source: str):
        self.spec = spec
        self.source = source
        self.steps: list[Step] = []
        for i, step in enumerate(spec.ops):
            try:
                res = Resources(**step.resources.model_dump()) if step.resources else None
                op = op_class(step.op)(step.params, resources=res)
            except OpConfigError as exc:
                raise RecipeError(f"{source}: ops[{i}]: {exc}") from None
            self.steps.append(Step(step, op))
        self.scorer_step = _scorer_step(spec.scores, source)
        self.scorer: QualityModels = self.scorer_step.op  # type: ignore[assignment]
        if spec.output.alpha and not any(s.op.name == "remove_background" for s in self.steps):
            raise RecipeError(f"{source}: output.alpha writes the product matte, but no step makes one; add remove_background to ops")
        fanning = [s.op.name for s in self.steps if hasattr(s.op, "segment_ids")]
        if len(fanning) > 1:
            raise RecipeError(f"{source}: at most one segment step per recipe, got {fanning}")
        self.hash = hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def op_keys(self) -> list[str]:
        return [s.op.key for s in self.steps]

    def fan_out(self) -> list[str | None]:
        """The segment of each output variant: `variants` rows, each repeated per audience
        segment when the recipe has a segment step (segment None otherwise)."""
        segments: list[str | None] = [None]
        for s in self.steps:
            if hasattr(s.op, "segment_ids"):
                segments = list(s.op.segment_ids())
        return [seg for _ in range(self.spec.variants) for seg in segments]

    def model_refs(self) -> list[tuple[Step, str, str]]:
        """(step, config field, reference) for every model the recipe loads."""
        return [(s, field, ref) for s in [*self.steps, self.scorer_step] for field, ref in s.op.model_refs().items()]

    @property
    def uses_seed(self) -> bool:
        return any(s.op.uses_seed for s in self.steps)

    def canonical(self) -> dict:
        return {
            "name": self.spec.name,
            "variants": self.spec.variants,
            "output": self.spec.output.model_dump(),
            "ops": [{"op": s.op.key, "config": s.op.config.model_dump(mode="json")} for s in self.steps],
            "gate": {k: v.model_dump() for k, v in sorted(self.spec.gate.items())},
            "max_attempts": self.spec.max_attempts,
            **({"scores": self.scorer.config.model_dump()} if self.scorer.model_refs() else {}),
        }

    def retries(self, attempt: int) -> bool:
        """Whether a variant that failed the gate at `attempt` is tried again."""
        return self.uses_seed and attempt < self.spec.max_attempts

    def gate(self, scores: dict[str, float]) -> list[str]:
        """Reasons the scores fail the gate (empty = passed)."""
        reasons = []
        for key, t in self.spec.gate.items():
            v = scores.get(key)
            if isinstance(v, bool):
                v = float(v)  # compliance columns: 1 pass, 0 fail
            if v is None or (isinstance(v, float) and math.isnan(v)):
                reasons.append(f"{key} missing")
            elif t.min is not None and v < t.min:
                reasons.append(f"{key}={v:.4g} < min {t.min:g}")
            elif t.max is not None and v > t.max:
                reasons.append(f"{key}={v:.4g} > max {t.max:g}")
        # Not a threshold anyone may loosen: a variant a safety model flags never passes.
        unsafe = scores.get("score_unsafe")
        if unsafe is not None and not math.isnan(unsafe) and unsafe > 0:
            reasons.append(f"flagged by the safety model (score_unsafe={unsafe:.3g} > 0)")
        return reasons


def _scorer_step(scores: dict[str, Any], source: str) -> Step:
    """The recipe's model scorers as a step: their models in a QualityModels op, their
    placement (resources, pool, batch size) in a StepSpec, validated like an op step's."""
    config = {k: v for k, v in scores.items() if k not in SCORE_PLACEMENT_KEYS}
    try:
        placement = StepSpec(op=QualityModels.name, **{k: scores[k] for k in SCORE_PLACEMENT_KEYS if k in scores})
    except ValidationError as exc:
        raise RecipeError(f"{source}: scores: {_problems(exc)}") from None
    try:
        res = Resources(**placement.resources.model_dump()) if placement.resources else None
        op = QualityModels(config, resources=res)
    except OpConfigError as exc:
        raise RecipeError(f"{source}: scores: {exc}") from None
    return Step(placement, op)


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors())


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name (see `builtin_recipes()`), or a YAML file by path."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise RecipeError(
                f"no recipe {name_or_path!r}: not a file, and not a built-in recipe "
                f"({', '.join(builtin_recipes())}); pass a path to a recipe YAML"
            )
        path = builtin
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with name, ops, ...; got {type(data).__name__}")
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {_problems(exc)}") from None
    return Recipe(spec, str(path))


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
