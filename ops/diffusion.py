"""Diffusion ops (diffusers): new scenes, restyles, outpainting and instruction edits, with
the product's own pixels composited back after every one of them.

Each op loads a diffusers `save_pretrained` directory from the model store once per worker,
renders a prompt per row from its template and the row's catalog fields, and runs rows of
the same working-canvas size through the pipeline together on a GPU (one call, a generator
per row). The ops are `PhasedOp`s: in a run, canvas preparation and paste-back run in CPU
stages around the GPU pool, and the pool's actor only stacks staged canvases into tensors
(pinned memory, fixed batch shapes) and calls the pipeline, compiled by default on CUDA. A generator per row fixes each row's noise, but a batched UNet's arithmetic still
depends on the batch size by a few 1/255 steps; on the CPU, where batching buys little, each
row runs alone, so a rerun reproduces its image bit for bit whatever rows shared its batch.

Generation happens on a working canvas (`size` on the long side, both sides multiples of 64,
e.g. 512 for SD 1.5); the result is resized back to the row's resolution and the product is
pasted over it at full resolution, so the product region is the source's own pixels whatever
the canvas size.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ops.base import NO_MASK, Item, OpConfig, OpInputError, PhasedOp, Resources, Staged, has_mask
from ops.composite import feather_alpha, paste_product, product_core, repaint_mask
from ops.geometry import parse_aspect, translate_step
from ops.models import LORA_WEIGHTS, LocalModel, ModelError, ModelInfo, offline_hub
from ops.prompts import check_template, render
from ops.registry import register
from ops.torch_runtime import Device, HostCopy, Precision, Runtime, device_lock, generators, pick_runtime, staged_tensor, use_compile_cache

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
    # 16: the smallest batch within 3% of the fastest in the H200 sweep (docs/benchmarks.md).
    max_batch: int = Field(16, ge=1, le=64, description="rows per pipeline call on a GPU (one on the CPU); also the pool's batch size unless the step sets one")
    device: Device = "auto"
    precision: Precision = "auto"
    compile: bool | None = Field(
        None, description="torch.compile the UNet: default on CUDA (compiled once per node into a cache; see docs/benchmarks.md), never on the CPU; false turns it off"
    )
    lora: list[LoraRef] = Field(default_factory=list, description="LoRA adapters on the UNet: {model, scale} or a list of them")

    @field_validator("lora", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, (dict, LoraRef)) else v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        return check_template(v, op_name="diffusion")


class DiffusionOp(PhasedOp):
    """Shared machinery; subclasses say which pipeline they need and how a row maps to and
    from the canvas. In a run, `prepare` and `finish` run in CPU stages around the GPU pool,
    whose actor only stacks the staged canvases into tensors and calls the pipeline."""

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

    def pool_batch_size(self) -> int:
        # A compiled UNet pads every call to max_batch: smaller pool batches would waste it.
        return self.config.max_batch

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
        # Compiled by default on CUDA, where it pays (docs/benchmarks.md); never on the CPU.
        self.compiled = self.runtime.on_gpu and (c.compile is None or c.compile)
        adapters = tuple((self.models[f"lora.{i}"], a.scale) for i, a in enumerate(c.lora))
        self.pipe = load_pipeline(self.models["model"], self.pipeline_kind, self.runtime, compile_unet=self.compiled, adapters=adapters)
        self.lock = device_lock(self.models["model"].sha256)
        if self.compiled:
            self.warm_up()

    def warm_up(self) -> None:
        """Compile the UNet now, at the batch shape every call will have (a full batch on the
        square canvas), so the first real batch does not pay it; with the node's compile cache
        warm this is a cache load. If compiling fails (no compiler, an unsupported op), the
        op falls back to the eager UNet with a warning instead of failing its rows."""
        side = self.canvas_for(1, 1)[0]
        blank = np.full((side, side, 3), 127, np.uint8)
        dummy = Staged(blank, np.full((side, side), 255, np.uint8), 0, {"prompt": "", "negative": "", "canvas": [side, side]})
        t0 = time.perf_counter()
        try:
            self.generate([dummy], steps=1)
            log.info("op %s: compiled UNet warmed at batch %d, %dx%d in %.1f s", self.name, self.config.max_batch, side, side, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - compile is an optimisation, never a failure
            log.warning("op %s: torch.compile failed (%s: %s); running the eager UNet. Set compile: false to skip the attempt.", self.name, type(exc).__name__, exc)
            uncompile(self.pipe)
            self.compiled = False

    # ------------------------------------------------------------------ phases

    def check_item(self, item: Item) -> None:
        product_core(item.mask, self.name)

    def canvas_for(self, width: int, height: int) -> tuple[int, int]:
        """Working canvas with the row's aspect: long side `size`, both multiples of 64."""
        m, size = self.scale_multiple, self.config.size
        long_side = max(m, round(size / m) * m)
        if width >= height:
            return long_side, max(m, round(long_side * height / width / m) * m)
        return max(m, round(long_side * width / height / m) * m), long_side

    def prompts(self, item: Item) -> dict[str, str]:
        return {"prompt": render(self.config.prompt, item.context), "negative": render(self.config.negative_prompt, item.context)}

    def prepare(self, item: Item) -> Staged:
        """Default (scene-like): the row's image and a repaint mask outside the product, on the
        working canvas (CPU; raises for a row that cannot run)."""
        alpha = feather_alpha(product_core(item.mask, self.name), self.config.feather_px)
        h, w = item.image.shape[:2]
        cw, ch = self.canvas_for(w, h)
        image = _resized(item.image, cw, ch, cv2.INTER_AREA)
        repaint = _resized(repaint_mask(alpha), cw, ch, cv2.INTER_NEAREST)
        return Staged(image, repaint, item.seed, {**self.prompts(item), "canvas": [cw, ch]})

    def run_model(self, staged: list[Staged]) -> list[np.ndarray]:
        """Rows with the same canvas run together, at most max_batch per pipeline call (one on
        the CPU: see the module docstring)."""
        per_call = self.config.max_batch if self.runtime.on_gpu else 1
        out: list[np.ndarray | None] = [None] * len(staged)
        by_canvas: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(staged):
            by_canvas.setdefault(tuple(s.meta["canvas"]), []).append(i)
        for rows in by_canvas.values():
            for start in range(0, len(rows), per_call):
                chunk = rows[start : start + per_call]
                for i, image in zip(chunk, self.generate([staged[i] for i in chunk])):
                    out[i] = image
        return out

    def generate(self, staged: list[Staged], steps: int | None = None) -> list[np.ndarray]:
        """One pipeline call. A compiled UNet always sees a full batch (the last one is padded
        with copies of its last row, whose outputs are dropped), so it never recompiles."""
        import torch

        c, n = self.config, len(staged)
        if self.compiled and n < c.max_batch:
            staged = staged + [staged[-1]] * (c.max_batch - n)
        kwargs: dict[str, Any] = {
            "prompt": [s.meta["prompt"] for s in staged],
            "negative_prompt": [s.meta["negative"] for s in staged],
            "image": staged_tensor([s.image for s in staged], self.runtime),
            "num_inference_steps": steps or c.steps,
            "guidance_scale": c.guidance,
            "generator": generators([s.seed for s in staged], self.runtime.device if self.runtime.on_gpu else "cpu"),
            "output_type": "pt",
        }
        kwargs.update(self.pipeline_kwargs(staged))
        with self.lock, torch.inference_mode():
            copy = HostCopy(self.pipe(**kwargs).images[:n])
        # Outside the lock: in a pool actor running two batches, the other one queues its
        # kernels while this one waits for its copy back (docs/benchmarks.md).
        return copy.wait()

    def pipeline_kwargs(self, staged: list[Staged]) -> dict[str, Any]:
        w, h = staged[0].meta["canvas"]
        return {"mask_image": staged_tensor([s.mask for s in staged], self.runtime), "height": h, "width": w, "strength": 1.0}

    def finish(self, item: Item, staged: Staged, output: np.ndarray) -> Item:
        """Back to the row's resolution, with the product's own pixels pasted back (CPU)."""
        h, w = item.image.shape[:2]
        full = _resized(output, w, h, cv2.INTER_CUBIC if output.shape[0] < h else cv2.INTER_AREA)
        alpha = feather_alpha(product_core(item.mask, self.name), self.config.feather_px)
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

    def prepare(self, item: Item) -> Staged:
        product_core(item.mask, self.name)
        h, w = item.image.shape[:2]
        cw, ch = self.canvas_for(w, h)
        return Staged(_resized(item.image, cw, ch, cv2.INTER_AREA), NO_MASK, item.seed, {**self.prompts(item), "canvas": [cw, ch]})

    def pipeline_kwargs(self, staged: list[Staged]) -> dict[str, Any]:
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

    def pipeline_kwargs(self, staged: list[Staged]) -> dict[str, Any]:
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

    def prepare(self, item: Item) -> Staged:
        h, w = item.image.shape[:2]
        nw, nh, dx, dy = self.placement(w, h)
        # Edge-replicated border: a neutral start for the model where there are no pixels yet.
        frame = cv2.copyMakeBorder(item.image, dy, nh - h - dy, dx, nw - w - dx, cv2.BORDER_REPLICATE)
        repaint = np.full((nh, nw), 255, np.uint8)
        repaint[dy : dy + h, dx : dx + w] = 0
        cw, ch = self.canvas_for(nw, nh)
        return Staged(
            cv2.resize(frame, (cw, ch), interpolation=cv2.INTER_AREA),
            cv2.resize(repaint, (cw, ch), interpolation=cv2.INTER_NEAREST),
            item.seed,
            {**self.prompts(item), "canvas": [cw, ch]},
        )

    def finish(self, item: Item, staged: Staged, output: np.ndarray) -> Item:
        h, w = item.image.shape[:2]
        nw, nh, dx, dy = self.placement(w, h)
        out = _resized(output, nw, nh, cv2.INTER_CUBIC).copy()
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

    def prompts(self, item: Item) -> dict[str, str]:
        segment = item.context.get("segment")
        by_id = {s.id: s.prompt for s in self.config.segments}
        if segment not in by_id:
            raise OpInputError(f"segment_variants: row has segment {segment!r}, not one of {sorted(by_id)}")
        return {"prompt": render(by_id[segment], item.context), "negative": render(self.config.negative_prompt, item.context)}


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
                    # Static shapes (batches are padded to max_batch): never a dynamic-shape
                    # graph, and a new canvas size is one more cached graph, not a rebuild.
                    use_compile_cache()
                    base.unet = torch.compile(base.unet, dynamic=False)
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


def uncompile(pipe) -> None:
    """Put the eager UNet back into `pipe` and every cached pipeline sharing its compiled one."""
    compiled = pipe.unet
    eager = getattr(compiled, "_orig_mod", None)
    if eager is None:
        return
    with _pipes_lock:
        for p in [pipe, *_pipes.values()]:
            if p.unet is compiled:
                p.unet = eager


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
