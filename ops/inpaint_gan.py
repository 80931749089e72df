"""GAN inpainting (LaMa family, through spandrel) for overlay, watermark and scratch removal:
the learned alternative to `remove_overlay`'s OpenCV inpainting, with the same mask modes
(a given mask from the manifest, detection, or either).

Only the masked region changes: the model sees a crop around the region with context, and
its output is pasted back inside the (dilated) mask alone, so every other pixel is the
source's own."""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from ops.base import Batch, Item, Op, Resources, batch_of, items_of
from ops.gan import SPANDREL_SUFFIXES, check_checkpoint, load_spandrel, model_dtype
from ops.geometry import mask_bbox
from ops.models import ModelInfo
from ops.overlay import RemoveOverlayConfig, overlay_region
from ops.registry import register
from ops.torch_runtime import Device, Precision, device_lock, pick_runtime, to_tensor, to_uint8


class InpaintGanConfig(RemoveOverlayConfig):
    model: str = Field(..., min_length=1, description="LaMa-family checkpoint: local path or s3:// URI")
    context: float = Field(1.0, ge=0, le=4, description="context around the region, as a fraction of its size")
    work_side: int = Field(1024, ge=64, le=4096, description="crops larger than this are inpainted downscaled")
    device: Device = "auto"
    precision: Precision = "auto"


@register
class InpaintGan(Op):
    name = "inpaint_gan"
    version = "1"
    Config = InpaintGanConfig
    generative = True
    model_fields = ("model",)
    default_resources = Resources(cpus=1, gpus=1, memory_mb=4000)

    def check_model(self, field: str, info: ModelInfo) -> None:
        check_checkpoint(self.name, info, SPANDREL_SUFFIXES)

    def setup(self) -> None:
        self.runtime = pick_runtime(self.config.device, self.config.precision, cpu_threads=self.resources.cpus)
        self.desc = load_spandrel(self.models["model"], self.runtime, ("Inpainting",), self.name)

    def __call__(self, batch: Batch) -> Batch:
        self.ensure_setup()
        return batch_of([self.inpaint(item) for item in items_of(batch)], batch)

    def inpaint(self, item: Item) -> Item:
        region = overlay_region(item, self.config)
        if region is None:
            return item
        import torch

        c = self.config
        h, w = item.image.shape[:2]
        # 1. A crop around the region, with context on every side.
        x0, y0, x1, y1 = mask_bbox(region)
        mx, my = round((x1 - x0) * c.context) + 16, round((y1 - y0) * c.context) + 16
        x0, y0, x1, y1 = max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)
        crop, crop_mask = item.image[y0:y1, x0:x1], region[y0:y1, x0:x1]
        # 2. At most work_side on the long side (LaMa is trained around 512 px).
        s = min(1.0, c.work_side / max(crop.shape[:2]))
        size = (max(8, round(crop.shape[1] * s)), max(8, round(crop.shape[0] * s)))
        small = cv2.resize(crop, size, interpolation=cv2.INTER_AREA) if s < 1 else crop
        small_mask = cv2.resize(crop_mask, size, interpolation=cv2.INTER_NEAREST) if s < 1 else crop_mask
        rt = self.runtime.__class__(self.runtime.device, model_dtype(self.desc))
        with device_lock(id(self.desc)), torch.inference_mode():
            m = torch.from_numpy((small_mask >= 128).astype(np.float32))[None, None].to(rt.device, rt.dtype)
            filled = to_uint8(self.desc(to_tensor([small], rt), m))[0]
        if s < 1:
            filled = cv2.resize(filled, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_CUBIC)
        # 3. Only pixels inside the region change.
        out = item.image.copy()
        inside = crop_mask >= 128
        out[y0:y1, x0:x1][inside] = filled[inside]
        return item.with_image(out)
