"""Super-resolution to an exact output size.

Two backends:
- `spandrel`: ESRGAN / Real-ESRGAN / SwinIR / ... checkpoints (`.safetensors`, `.pth`), on
  GPU when the worker has one, in overlapping tiles so large images fit in memory.
- `opencv`: OpenCV's `dnn_superres` graphs (FSRCNN, ESPCN, LapSRN, EDSR `.pb`), on CPU.

The model runs as many times as its native scale needs to reach the target (a x2 model
makes a x3 target in two passes), then an area resize lands on the exact size asked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from ops.base import Batch, Item, Op, OpConfig, OpInputError, Resources, batch_of, has_mask, items_of
from ops.gan import SPANDREL_SUFFIXES, check_checkpoint, load_spandrel, run_tiled
from ops.geometry import scale_step
from ops.models import ModelError, ModelInfo
from ops.registry import register
from ops.torch_runtime import Device, Precision, pick_runtime

OPENCV_ALGORITHMS = ("edsr", "espcn", "fsrcnn", "lapsrn")
MAX_PASSES = 3


class UpscaleConfig(OpConfig):
    model: str = Field(..., min_length=1, description="checkpoint file: local path or s3:// URI")
    backend: Literal["auto", "spandrel", "opencv"] = Field("auto", description="auto: .pb files use opencv, others spandrel")
    factor: float | None = Field(None, gt=1, le=16, description="output = input x factor")
    long_side: int | None = Field(None, ge=16, le=16384, description="output long side in px (aspect kept)")
    width: int | None = Field(None, ge=16, le=16384, description="exact output width (with height)")
    height: int | None = Field(None, ge=16, le=16384, description="exact output height (with width)")
    only_if_smaller: bool = Field(True, description="leave rows already at least the target size untouched")
    tile: int = Field(512, ge=32, le=4096, description="input tile size (px) for spandrel models")
    overlap: int = Field(16, ge=0, le=256)
    tile_batch: int = Field(4, ge=1, le=64)
    max_output_pixels: int = Field(64_000_000, ge=1)
    opencv_algorithm: Literal["edsr", "espcn", "fsrcnn", "lapsrn"] | None = None
    opencv_scale: int | None = Field(None, ge=2, le=8)
    device: Device = "auto"
    precision: Precision = "auto"

    @model_validator(mode="after")
    def _one_target(self):
        given = [n for n in ("factor", "long_side") if getattr(self, n) is not None]
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height go together; for one side use long_side")
        if self.width is not None:
            given.append("width/height")
        if len(given) > 1:
            raise ValueError(f"give one output size, not {' and '.join(given)}")
        return self


@register
class Upscale(Op):
    name = "upscale"
    version = "1"
    Config = UpscaleConfig
    model_fields = ("model",)
    default_resources = Resources(cpus=1, gpus=1, memory_mb=4000)

    def __init__(self, config=None, *, resources: Resources | None = None):
        super().__init__(config, resources=resources)
        if resources is None and self.backend == "opencv":
            self.resources = Resources(cpus=1, gpus=0, memory_mb=2000)  # dnn_superres runs on CPU

    @property
    def backend(self) -> str:
        if self.config.backend != "auto":
            return self.config.backend
        return "opencv" if self.config.model.lower().endswith(".pb") else "spandrel"

    def check_model(self, field: str, info: ModelInfo) -> None:
        check_checkpoint(self.name, info, (".pb",) if self.backend == "opencv" else SPANDREL_SUFFIXES)

    def setup(self) -> None:
        model = self.models["model"]
        if self.backend == "opencv":
            algo, scale = opencv_model_kind(model.ref, self.config.opencv_algorithm, self.config.opencv_scale)
            self.sr = cv2.dnn_superres.DnnSuperResImpl_create()
            try:
                self.sr.readModel(str(model.path))
                self.sr.setModel(algo, scale)
            except cv2.error as exc:
                raise ModelError(f"model {model.ref!r} is not a readable OpenCV {algo} x{scale} graph: {exc.msg.strip()}") from None
            self.scale = scale
        else:
            self.runtime = pick_runtime(self.config.device, self.config.precision, cpu_threads=self.resources.cpus)
            self.desc = load_spandrel(model, self.runtime, ("SR", "Restoration"), self.name)
            self.scale = int(self.desc.scale)

    def target(self, w: int, h: int) -> tuple[int, int]:
        c = self.config
        if c.width is not None:
            tw, th = c.width, c.height
        elif c.long_side is not None:
            s = c.long_side / max(w, h)
            tw, th = max(1, round(w * s)), max(1, round(h * s))
        else:
            f = c.factor or float(self.scale)
            tw, th = max(1, round(w * f)), max(1, round(h * f))
        if tw * th > c.max_output_pixels:
            raise OpInputError(f"upscale target {tw}x{th} is over max_output_pixels={c.max_output_pixels}; lower the target")
        return tw, th

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        items = items_of(batch)
        targets = [self.target(it.image.shape[1], it.image.shape[0]) for it in items]
        todo = [i for i, (it, (tw, th)) in enumerate(zip(items, targets)) if not (self.config.only_if_smaller and tw <= it.image.shape[1] and th <= it.image.shape[0])]
        images = {i: items[i].image for i in todo}
        # 1. Model passes until every row reaches its target (rows needing fewer stop early).
        for _ in range(MAX_PASSES):
            need = [i for i in todo if images[i].shape[1] < targets[i][0] or images[i].shape[0] < targets[i][1]]
            if not need:
                break
            for i, out in zip(need, self.super_resolve([images[i] for i in need])):
                images[i] = out
        # 2. Exact size: area resize down from the model's output (or up, past MAX_PASSES).
        out_items = []
        for i, it in enumerate(items):
            if i not in images:
                out_items.append(it)
                continue
            tw, th = targets[i]
            img = images[i]
            interp = cv2.INTER_AREA if img.shape[1] >= tw else cv2.INTER_CUBIC
            img = cv2.resize(img, (tw, th), interpolation=interp) if img.shape[:2] != (th, tw) else img
            h, w = it.image.shape[:2]
            mask = cv2.resize(it.mask, (tw, th), interpolation=cv2.INTER_LINEAR) if has_mask(it.mask) else it.mask
            out_items.append(it.moved(img, mask, scale_step(tw / w, th / h)))
        return batch_of(out_items, batch)

    def super_resolve(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.backend == "opencv":
            return [cv2.cvtColor(self.sr.upsample(cv2.cvtColor(im, cv2.COLOR_RGB2BGR)), cv2.COLOR_BGR2RGB) for im in images]
        c = self.config
        return run_tiled(self.desc, images, self.runtime, tile=c.tile, overlap=c.overlap, tile_batch=c.tile_batch)


def opencv_model_kind(ref: str, algorithm: str | None, scale: int | None) -> tuple[str, int]:
    """Algorithm and scale of a dnn_superres graph, from the config or the file name
    (FSRCNN_x2.pb, ESPCN_x4.pb, LapSRN_x8.pb, EDSR_x3.pb as OpenCV's model zoo names them)."""
    stem = Path(ref).stem.lower()
    if algorithm is None:
        found = [a for a in OPENCV_ALGORITHMS if a in stem]
        if not found:
            raise ModelError(f"model {ref!r}: cannot tell the dnn_superres algorithm from the file name; set opencv_algorithm ({', '.join(OPENCV_ALGORITHMS)})")
        algorithm = min(found, key=stem.find)
    if scale is None:
        m = re.findall(r"x(\d)", stem)
        if not m:
            raise ModelError(f"model {ref!r}: cannot tell the scale from the file name; set opencv_scale")
        scale = int(m[-1])
    if algorithm == "lapsrn" and scale not in (2, 4, 8):
        raise ModelError(f"model {ref!r}: {algorithm} does not come in x{scale}")
    return algorithm, scale
