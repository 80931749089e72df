"""Diffusion ops (diffusers): new scenes, restyles, outpainting and instruction edits, with
the product's own pixels composited back after every one of them.

Each op loads a diffusers `save_pretrained` directory from the model store once per worker,
renders a prompt per row from its template and the row's catalog fields, and runs rows of
the same working-canvas size through the pipeline together on a GPU (one call, a generator
per row). A generator per row fixes each row's noise, but a batched UNet's arithmetic still
depends on the batch size by a few 1/255 steps; on the CPU, where batching buys little, each
row runs alone, so a rerun reproduces its image bit for bit whatever rows shared its batch.

Generation happens on a working canvas (`size` on the long side, both sides multiples of 64,
e.g. 512 for SD 1.5); the result is resized back to the row's resolution and the product is
pasted over it at full resolution, so the product region is the source's own pixels whatever
the canvas size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ops.base import Batch, Item, Op, OpConfig, OpInputError, Resources, batch_of, has_mask, items_of
from ops.composite import feather_alpha, paste_product, product_core, repaint_mask
from ops.geometry import parse_aspect, translate_step
from ops.models import LORA_WEIGHTS, LocalModel, ModelError, ModelInfo, offline_hub
from ops.prompts import check_template, render
from ops.registry import register
from ops.torch_runtime import Device, Precision, Runtime, device_lock, generators, pick_runtime

log = logging.getLogger(__name__)

# Pipeline classes (model_index.json `_class_name`) each op family can start from. diffusers'
# AutoPipeline maps any of them to the inpainting / img2img variant of the same family.
SD_FAMILY = {
    "StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline", "StableDiffusionXLImg2ImgPipeline",
}  # fmt: skip
INSTRUCT_FAMILY = {"StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline"}

DEFAULT_NEGATIVE = "blurry, lowres, distorted, watermark, text, logo, extra objects, deformed"


class LoraRef(BaseModel):
    """A LoRA adapter (as `skustudio train` writes it) and how strongly it applies."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, description="adapter directory: local path or s3:// prefix")
    scale: float = Field(1.0, ge=0, le=1, description="0 gives the base model's output exactly")


class DiffusionConfig(OpConfig):
    model: str = Field(..., min_length=1, description="diffusers save_pretrained directory: local path or s3:// prefix")
    prompt: str = "professional product photo of {title}, {category}, high detail"
    negative_prompt: str = DEFAULT_NEGATIVE
    steps: int = Field(20, ge=1, le=200)
    guidance: float = Field(7.5, ge=0, le=30)
    size: int = Field(512, ge=64, le=2048, description="working canvas long side (px), rounded to a multiple of 64")
    feather_px: float = Field(2.0, ge=0, le=64, description="ramp across the product edge when pasting it back")
    max_batch: int = Field(8, ge=1, le=64, description="rows per pipeline call on a GPU (one on the CPU)")
    device: Device = "auto"
    precision: Precision = "auto"
    compile: bool = Field(False, description="torch.compile the UNet (CUDA only; the first batch pays the compile)")
    lora: list[LoraRef] = Field(default_factory=list, description="LoRA adapters on the UNet: {model, scale} or a list of them")

    @field_validator("lora", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (dict, LoraRef)) else v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, op_name="diffusion")


@dataclasses.dataclass
class _Job:
    """One row's pipeline input on the working canvas."""

    row: int
    image: Image.Image
    mask: Image.Image | None
    prompt: str
    negative: str
    seed: int
    canvas: tuple[int, int]  # (width, height)
    alpha: np.ndarray | None = None  # full-resolution paste-back alpha, computed once


class DiffusionOp(Op):
    """Shared machinery; subclasses say which pipeline they need and how a row maps to and
    from the canvas."""

    Config = DiffusionConfig
    uses_seed = True
    generative = True
    model_fields = ("model",)
    default_resources = Resources(cpus=1, gpus=1, memory_mb=8000)
    pipeline_kind: ClassVar[Literal["inpaint", "img2img", "instruct"]] = "inpaint"
    # Canvas sides are multiples of this: SD's VAE downsamples 8x and its UNet 8x more.
    scale_multiple: ClassVar[int] = 64
    unet_in_channels: ClassVar[tuple[int, ...]] = (4, 9)

    # ------------------------------------------------------------------ model

    def model_refs(self) -> dict[str, str]:
        # Adapters are models like the base: fetched by the store, checked before the run,
        # and in every row's model / model_sha256 (so a changed adapter changes state keys).
        return {**super().model_refs(), **{f"lora.{i}": a.model for i, a in enumerate(self.config.lora)}}

    def check_model(self, field: str, info: ModelInfo) -> None:
        if field.startswith("lora."):
            if info.kind != "lora":
                raise ModelError(f"op {self.name!r}: lora {info.ref!r} is not a LoRA adapter (no {LORA_WEIGHTS}); train one with `skustudio train`")
            if info.class_name and info.class_name not in SD_FAMILY | INSTRUCT_FAMILY:
                raise ModelError(f"op {self.name!r}: lora {info.ref!r} was trained on a {info.class_name}, not a Stable Diffusion model")
            return
        family = INSTRUCT_FAMILY if self.pipeline_kind == "instruct" else SD_FAMILY
        if info.kind != "diffusers":
            raise ModelError(f"op {self.name!r} needs a diffusers pipeline directory, but model {info.ref!r} is a {info.suffix} checkpoint file")
        if info.class_name not in family:
            raise ModelError(
                f"op {self.name!r} cannot use model {info.ref!r}: it is a {info.class_name}, and this op needs one of "
                f"{', '.join(sorted(family))}"
            )
        if info.unet_in_channels is not None and info.unet_in_channels not in self.unet_in_channels:
            raise ModelError(
                f"op {self.name!r} cannot use model {info.ref!r}: its UNet takes {info.unet_in_channels} input channels, "
                f"this op needs {' or '.join(map(str, self.unet_in_channels))}"
                + (" (an inpainting checkpoint cannot do img2img; use the base model)" if info.unet_in_channels == 9 else "")
            )

    def setup(self) -> None:
        c = self.config
        self.runtime = pick_runtime(c.device, c.precision, cpu_threads=self.resources.cpus)
        adapters = tuple((self.models[f"lora.{i}"], a.scale) for i, a in enumerate(c.lora))
        self.pipe = load_pipeline(self.models["model"], self.pipeline_kind, self.runtime, compile_unet=c.compile, adapters=adapters)
        self.lock = device_lock(self.models["model"].sha256)

    # ------------------------------------------------------------------ rows

    def check_item(self, item: Item) -> None:
        product_core(item.mask, self.name)

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        items = items_of(batch)
        # 1. Map every row onto its working canvas (CPU; raises for a row that cannot run).
        jobs = [self.prepare(i, item) for i, item in enumerate(items)]
        # 2. Run rows with the same canvas together, at most max_batch per pipeline call
        #    (one on the CPU: see the module docstring).
        per_call = self.config.max_batch if self.runtime.on_gpu else 1
        generated: dict[int, np.ndarray] = {}
        by_canvas: dict[tuple[int, int], list[_Job]] = {}
        for job in jobs:
            by_canvas.setdefault(job.canvas, []).append(job)
        for group in by_canvas.values():
            for start in range(0, len(group), per_call):
                chunk = group[start : start + per_call]
                for job, out in zip(chunk, self.generate(chunk)):
                    generated[job.row] = out
        # 3. Back to each row's resolution, with the product's own pixels pasted back.
        return batch_of([self.finish(item, generated[i], jobs[i]) for i, item in enumerate(items)], batch)

    def canvas_for(self, width: int, height: int) -> tuple[int, int]:
        """Working canvas with the row's aspect: long side `size`, both multiples of 64."""
        m, size = self.scale_multiple, self.config.size
        long_side = max(m, round(size / m) * m)
        if width >= height:
            return long_side, max(m, round(long_side * height / width / m) * m)
        return max(m, round(long_side * width / height / m) * m), long_side

    def prompts(self, item: Item) -> tuple[str, str]:
        return render(self.config.prompt, item.context), render(self.config.negative_prompt, item.context)

    def prepare(self, row: int, item: Item) -> _Job:
        """Default (scene-like): the row's image and a repaint mask outside the product."""
        alpha = feather_alpha(product_core(item.mask, self.name), self.config.feather_px)
        h, w = item.image.shape[:2]
        cw, ch = self.canvas_for(w, h)
        prompt, negative = self.prompts(item)
        image = _resized(item.image, cw, ch, cv2.INTER_AREA)
        repaint = _resized(repaint_mask(alpha), cw, ch, cv2.INTER_NEAREST)
        return _Job(row, Image.fromarray(image), Image.fromarray(repaint), prompt, negative, item.seed, (cw, ch), alpha)

    def generate(self, jobs: list[_Job]) -> list[np.ndarray]:
        import torch

        c = self.config
        kwargs: dict[str, Any] = {
            "prompt": [j.prompt for j in jobs],
            "negative_prompt": [j.negative for j in jobs],
            "image": [j.image for j in jobs],
            "num_inference_steps": c.steps,
            "guidance_scale": c.guidance,
            "generator": generators([j.seed for j in jobs], self.runtime.device if self.runtime.on_gpu else "cpu"),
            "output_type": "np",
        }
        kwargs.update(self.pipeline_kwargs(jobs))
        with self.lock, torch.inference_mode():
            images = self.pipe(**kwargs).images
        return [np.clip(np.asarray(im) * 255.0 + 0.5, 0, 255).astype(np.uint8) for im in images]

    def pipeline_kwargs(self, jobs: list[_Job]) -> dict[str, Any]:
        w, h = jobs[0].canvas
        return {"mask_image": [j.mask for j in jobs], "height": h, "width": w, "strength": 1.0}

    def finish(self, item: Item, generated: np.ndarray, job: _Job) -> Item:
        h, w = item.image.shape[:2]
        full = _resized(generated, w, h, cv2.INTER_CUBIC if generated.shape[0] < h else cv2.INTER_AREA)
        alpha = job.alpha if job.alpha is not None else feather_alpha(product_core(item.mask, self.name), self.config.feather_px)
        return item.with_image(paste_product(full, item.image, alpha))


# ---------------------------------------------------------------------------------- ops


@register
class Scene(DiffusionOp):
    """A new background around the product: inpaint everything outside the product mask."""

    name = "scene"
    version = "1"


class RestyleConfig(DiffusionConfig):
    prompt: str = "{title}, warm seasonal lifestyle setting, soft natural light"
    strength: float = Field(0.55, gt=0, le=1, description="how far from the source image (img2img)")


@register
class Restyle(DiffusionOp):
    """img2img over the whole frame (lighting, season, material looks); product pasted back."""

    name = "restyle"
    version = "1"
    Config = RestyleConfig
    pipeline_kind = "img2img"
    unet_in_channels = (4,)

    def prepare(self, row: int, item: Item) -> _Job:
        product_core(item.mask, self.name)
        h, w = item.image.shape[:2]
        cw, ch = self.canvas_for(w, h)
        prompt, negative = self.prompts(item)
        image = _resized(item.image, cw, ch, cv2.INTER_AREA)
        return _Job(row, Image.fromarray(image), None, prompt, negative, item.seed, (cw, ch))

    def pipeline_kwargs(self, jobs: list[_Job]) -> dict[str, Any]:
        return {"strength": self.config.strength}


class InstructEditConfig(DiffusionConfig):
    prompt: str = "soft window light"
    negative_prompt: str = ""
    image_guidance: float = Field(1.5, ge=0, le=10, description="how closely to follow the input image")


@register
class InstructEdit(Restyle):
    """Edit by instruction with an InstructPix2Pix-style pipeline ("make it golden hour")."""

    name = "instruct_edit"
    version = "1"
    Config = InstructEditConfig
    pipeline_kind = "instruct"
    unet_in_channels = (8,)

    def pipeline_kwargs(self, jobs: list[_Job]) -> dict[str, Any]:
        return {"image_guidance_scale": self.config.image_guidance}


class OutpaintConfig(DiffusionConfig):
    prompt: str = "{title}, seamless continuation of the scene, product photography"
    aspect: str = Field("4:5", description="target width:height, e.g. 4:5, 16:9, 1:1")
    anchor: Literal["center", "top", "bottom", "left", "right"] = "center"

    @field_validator("aspect")
    @classmethod
    def _aspect(cls, v: str) -> str:
        parse_aspect(v)
        return v


@register
class Outpaint(DiffusionOp):
    """Extend the canvas to a target aspect ratio; every original pixel is kept."""

    name = "outpaint"
    version = "1"
    Config = OutpaintConfig

    def check_item(self, item: Item) -> None:
        pass  # keeps the whole original frame, so it needs no product mask

    def placement(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(new width, new height, x offset, y offset) of the original inside the new frame."""
        ar = parse_aspect(self.config.aspect)
        nw, nh = (max(w, round(h * ar)), h) if w / h < ar else (w, max(h, round(w / ar)))
        dx = {"left": 0, "right": nw - w}.get(self.config.anchor, (nw - w) // 2)
        dy = {"top": 0, "bottom": nh - h}.get(self.config.anchor, (nh - h) // 2)
        return nw, nh, dx, dy

    def prepare(self, row: int, item: Item) -> _Job:
        h, w = item.image.shape[:2]
        nw, nh, dx, dy = self.placement(w, h)
        # Edge-replicated border: a neutral start for the model where there are no pixels yet.
        frame = cv2.copyMakeBorder(item.image, dy, nh - h - dy, dx, nw - w - dx, cv2.BORDER_REPLICATE)
        repaint = np.full((nh, nw), 255, np.uint8)
        repaint[dy : dy + h, dx : dx + w] = 0
        cw, ch = self.canvas_for(nw, nh)
        prompt, negative = self.prompts(item)
        return _Job(
            row,
            Image.fromarray(cv2.resize(frame, (cw, ch), interpolation=cv2.INTER_AREA)),
            Image.fromarray(cv2.resize(repaint, (cw, ch), interpolation=cv2.INTER_NEAREST)),
            prompt,
            negative,
            item.seed,
            (cw, ch),
        )

    def finish(self, item: Item, generated: np.ndarray, job: _Job) -> Item:
        h, w = item.image.shape[:2]
        nw, nh, dx, dy = self.placement(w, h)
        out = _resized(generated, nw, nh, cv2.INTER_CUBIC).copy()
        out[dy : dy + h, dx : dx + w] = item.image
        mask = item.mask
        if has_mask(mask):
            mask = cv2.copyMakeBorder(mask, dy, nh - h - dy, dx, nw - w - dx, cv2.BORDER_CONSTANT, value=0)
        return item.moved(out, mask, translate_step(dx, dy))


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, op_name="segment_variants")


class SegmentVariantsConfig(DiffusionConfig):
    segments: list[Segment] = Field(..., min_length=1, max_length=64)

    @field_validator("segments")
    @classmethod
    def _unique(cls, v: list[Segment]) -> list[Segment]:
        ids = [s.id for s in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"segment ids must be unique, got {ids}")
        return v


@register
class SegmentVariants(Scene):
    """One scene per audience segment: the pipeline fans each input out into one row per
    segment (the `segment` column) and this op paints each with its segment's prompt."""

    name = "segment_variants"
    version = "1"
    Config = SegmentVariantsConfig

    def segment_ids(self) -> list[str]:
        return [s.id for s in self.config.segments]

    def prompts(self, item: Item) -> tuple[str, str]:
        segment = item.context.get("segment")
        by_id = {s.id: s.prompt for s in self.config.segments}
        if segment not in by_id:
            raise OpInputError(f"segment_variants: row has segment {segment!r}, not one of {sorted(by_id)}")
        return render(by_id[segment], item.context), render(self.config.negative_prompt, item.context)


def _resized(image: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    if image.shape[1] == width and image.shape[0] == height:
        return image
    return cv2.resize(image, (width, height), interpolation=interpolation)


# ---------------------------------------------------------------------------------- loading

_pipes: dict[tuple, Any] = {}
_pipes_lock = threading.Lock()


def load_pipeline(model: LocalModel, kind: str, runtime: Runtime, *, compile_unet: bool = False, adapters: tuple[tuple[LocalModel, float], ...] = ()):
    """Load a diffusers pipeline from local files only, once per process per (model, device,
    dtype, adapters): several ops or recipes using one model share its weights, and the
    inpainting / img2img views of one model share components through `from_pipe`. Adapters
    change the shared UNet, so each set of (adapter, scale) gets its own copy of the base."""
    offline_hub()
    import diffusers.utils.logging as dlog
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, DiffusionPipeline

    dlog.disable_progress_bar()
    with _pipes_lock:
        base_key = (model.sha256, runtime.device, str(runtime.dtype), compile_unet, tuple((a.sha256, scale) for a, scale in adapters))
        base = _pipes.get(base_key)
        if base is None:
            index = json.loads((model.path / "model_index.json").read_text())
            extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            try:
                base = DiffusionPipeline.from_pretrained(str(model.path), torch_dtype=runtime.dtype, local_files_only=True, **extra)
            except Exception as exc:  # noqa: BLE001 - any loader failure is a broken model
                raise ModelError(f"model {model.ref!r} (sha256 {model.sha256[:12]}) failed to load: {type(exc).__name__}: {exc}") from None
            if adapters:
                _load_adapters(base, model, adapters)
            base.to(runtime.device)
            base.set_progress_bar_config(disable=True)
            if runtime.on_gpu:
                base.unet.to(memory_format=torch.channels_last)
                base.vae.to(memory_format=torch.channels_last)
                if compile_unet:
                    base.unet = torch.compile(base.unet)
            _pipes[base_key] = base
            log.info("loaded %s (%s) on %s as %s", model.ref, type(base).__name__, runtime.device, runtime.dtype)
        key = base_key + (kind,)
        pipe = _pipes.get(key)
        if pipe is None:
            if kind == "instruct":
                pipe = base
            else:
                auto = AutoPipelineForInpainting if kind == "inpaint" else AutoPipelineForImage2Image
                try:
                    pipe = auto.from_pipe(base)
                except Exception as exc:  # noqa: BLE001
                    raise ModelError(f"model {model.ref!r} cannot serve as an {kind} pipeline: {exc}") from None
                pipe.set_progress_bar_config(disable=True)
            _pipes[key] = pipe
        return pipe


def _load_adapters(pipe, model: LocalModel, adapters: tuple[tuple[LocalModel, float], ...]) -> None:
    """Load LoRA adapters into the pipeline's UNet at their scales (peft backend). A scale
    of 0 keeps the adapter loaded but adds exactly nothing: the base model's output."""
    names = []
    for i, (adapter, _) in enumerate(adapters):
        name = f"a{i}-{adapter.sha256[:12]}"
        try:
            pipe.load_lora_weights(str(adapter.path), weight_name=LORA_WEIGHTS, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - shape mismatches, missing peft, a broken file
            raise ModelError(
                f"lora {adapter.ref!r} (sha256 {adapter.sha256[:12]}) does not fit model {model.ref!r}: {type(exc).__name__}: {exc}; "
                "use an adapter trained on this base model (its training_card.json names the base)"
            ) from None
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in adapters])
