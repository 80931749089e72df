"""Compose the cut-out product onto a solid background: scaled to a fill ratio, centred,
optionally with a soft contact shadow. This is the marketplace 'main image' shot."""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field, model_validator

from ops.base import Item, Op, OpConfig, OpInputError, chain_affines, has_mask
from ops.geometry import mask_bbox, parse_aspect, scale_step, translate_step
from ops.registry import register


class ComposeConfig(OpConfig):
    size: int = Field(2000, ge=16, le=10000, description="longer side of the canvas in pixels")
    aspect: str = Field("1:1", description="canvas width:height")
    fill: float = Field(0.85, gt=0, le=1, description="product box's longer side / canvas's matching side")
    background: tuple[int, int, int] = (255, 255, 255)
    shadow: bool = Field(False, description="soft contact shadow under the product (not pure white below it!)")
    shadow_opacity: float = Field(0.35, ge=0, le=1)
    shadow_softness: float = Field(0.04, gt=0, le=0.5, description="blur, as a fraction of the product width")
    max_upscale: float = Field(4.0, ge=1, description="refuse to enlarge the product more than this")

    @model_validator(mode="after")
    def _check(self):
        parse_aspect(self.aspect)
        return self


@register
class Compose(Op):
    name = "compose"
    version = "1"
    Config = ComposeConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        if not has_mask(item.mask):
            raise OpInputError("compose needs a product mask; put remove_background before compose in the recipe")
        bbox = mask_bbox(item.mask)
        if bbox is None:
            raise OpInputError("compose: the product mask is empty (no product found)")

        # 1. Canvas size from the longer side and aspect.
        a = parse_aspect(c.aspect)
        cw, ch = (c.size, max(1, round(c.size / a))) if a >= 1 else (max(1, round(c.size * a)), c.size)

        # 2. Scale the product box so its binding side fills `fill` of the canvas.
        x0, y0, x1, y1 = bbox
        bw, bh = x1 - x0, y1 - y0
        s = min(c.fill * cw / bw, c.fill * ch / bh)
        if s > c.max_upscale:
            raise OpInputError(
                f"the product is {bw}x{bh} px; filling {c.fill:.0%} of a {cw}x{ch} canvas needs {s:.1f}x enlargement, "
                f"over max_upscale={c.max_upscale}; use a larger source or a smaller canvas"
            )

        # 3. One affine for the whole move: crop to the box, scale, centre.
        tx, ty = (cw - bw * s) / 2.0, (ch - bh * s) / 2.0
        step = chain_affines(translate_step(tx, ty), scale_step(s, s), translate_step(-x0, -y0))
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LANCZOS4
        product = cv2.warpAffine(item.image, step, (cw, ch), flags=interp, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.warpAffine(item.mask, step, (cw, ch), flags=cv2.INTER_LINEAR, borderValue=0)

        # 4. Background (with shadow), then the product over it.
        canvas = np.empty((ch, cw, 3), np.float32)
        canvas[:] = c.background
        if c.shadow:
            canvas *= 1.0 - c.shadow_opacity * _contact_shadow(alpha, c.shadow_softness)[..., None]
        a = alpha.astype(np.float32)[..., None] / 255.0
        out = canvas * (1 - a) + product.astype(np.float32) * a
        return item.moved(np.clip(out + 0.5, 0, 255).astype(np.uint8), alpha, step)


def _contact_shadow(alpha: np.ndarray, softness: float) -> np.ndarray:
    """0..1 shadow density: a flat blurred ellipse just under the product's base."""
    bbox = mask_bbox(alpha)
    shadow = np.zeros(alpha.shape, np.float32)
    if bbox is None:
        return shadow
    x0, y0, x1, y1 = bbox
    bw = x1 - x0
    centre = (int((x0 + x1) / 2), int(y1 - 0.01 * bw))
    axes = (max(1, int(bw * 0.48)), max(1, int(bw * 0.05)))
    cv2.ellipse(shadow, centre, axes, 0, 0, 360, 1.0, -1)
    sigma = max(1.0, softness * bw)
    shadow = cv2.GaussianBlur(shadow, (0, 0), sigma)
    return shadow / max(float(shadow.max()), 1e-6)
