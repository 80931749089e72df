"""Resize, pad and crop. Each records the geometric step in the row's affine so fidelity
scores can map source pixels onto the output."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from ops.base import Item, Op, OpConfig, OpInputError, has_mask
from ops.registry import register

Colour = tuple[int, int, int]


def parse_aspect(text: str) -> float:
    """'4:5' -> 0.8 (width / height)."""
    try:
        w, h = (float(p) for p in text.split(":"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect must look like '1:1' or '4:5', got {text!r}") from None
    return w / h


def resample(image: np.ndarray, mask: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    shrinking = width * height < w * h
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4
    out = cv2.resize(image, (width, height), interpolation=interp)
    out_mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR) if has_mask(mask) else mask
    return out, out_mask


def scale_step(sx: float, sy: float) -> np.ndarray:
    # Pixel-centre convention: x' = (x + 0.5) * s - 0.5, as cv2.resize samples.
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def translate_step(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


class ResizeConfig(OpConfig):
    max_side: int | None = Field(None, gt=0, description="scale so the longer side is this")
    min_side: int | None = Field(None, gt=0, description="scale so the shorter side is this")
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    allow_upscale: bool = True

    @model_validator(mode="after")
    def _one_mode(self):
        modes = [self.max_side is not None, self.min_side is not None, self.width is not None or self.height is not None]
        if sum(modes) != 1:
            raise ValueError("give exactly one of max_side, min_side, or width/height")
        return self


@register
class Resize(Op):
    name = "resize"
    version = "1"
    Config = ResizeConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        h, w = item.image.shape[:2]
        if c.max_side:
            s = c.max_side / max(h, w)
            size = (round(w * s), round(h * s))
        elif c.min_side:
            s = c.min_side / min(h, w)
            size = (round(w * s), round(h * s))
        else:
            size = (c.width or round(w * c.height / h), c.height or round(h * c.width / w))
        if not c.allow_upscale and size[0] * size[1] > w * h:
            return item
        size = (max(1, size[0]), max(1, size[1]))
        image, mask = resample(item.image, item.mask, *size)
        return item.moved(image, mask, scale_step(size[0] / w, size[1] / h))


class PadConfig(OpConfig):
    aspect: str | None = Field(None, description="target width:height, e.g. '1:1'")
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    color: Colour = (255, 255, 255)

    @model_validator(mode="after")
    def _check(self):
        if (self.aspect is None) == (self.width is None and self.height is None):
            raise ValueError("give either aspect or width+height")
        if self.aspect is not None:
            parse_aspect(self.aspect)
        elif self.width is None or self.height is None:
            raise ValueError("width and height go together")
        return self


@register
class Pad(Op):
    name = "pad"
    version = "1"
    Config = PadConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        h, w = item.image.shape[:2]
        if c.aspect:
            a = parse_aspect(c.aspect)
            tw, th = (max(w, round(h * a)), h) if w / h < a else (w, max(h, round(w / a)))
        else:
            tw, th = c.width, c.height
            if tw < w or th < h:
                raise OpInputError(f"pad to {tw}x{th} is smaller than the {w}x{h} image; resize first")
        x0, y0 = (tw - w) // 2, (th - h) // 2
        canvas = np.empty((th, tw, 3), np.uint8)
        canvas[:] = c.color
        canvas[y0 : y0 + h, x0 : x0 + w] = item.image
        mask = item.mask
        if has_mask(mask):
            mask = np.zeros((th, tw), np.uint8)
            mask[y0 : y0 + h, x0 : x0 + w] = item.mask
        return item.moved(canvas, mask, translate_step(x0, y0))


class CropConfig(OpConfig):
    to: Literal["product", "box"] = "product"
    margin: float = Field(0.05, ge=0, le=1, description="fraction of the product box added on each side")
    box: tuple[float, float, float, float] | None = Field(None, description="x0,y0,x1,y1 as fractions of the frame")

    @model_validator(mode="after")
    def _check(self):
        if self.to == "box":
            if self.box is None:
                raise ValueError("to: box needs box: [x0, y0, x1, y1]")
            x0, y0, x1, y1 = self.box
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {self.box}")
        return self


@register
class Crop(Op):
    name = "crop"
    version = "1"
    Config = CropConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        h, w = item.image.shape[:2]
        if c.to == "box":
            x0, y0, x1, y1 = c.box
            bx0, by0, bx1, by1 = int(x0 * w), int(y0 * h), max(int(x0 * w) + 1, round(x1 * w)), max(int(y0 * h) + 1, round(y1 * h))
        else:
            if not has_mask(item.mask):
                raise OpInputError("crop to product needs a product mask; put remove_background before crop in the recipe")
            bbox = mask_bbox(item.mask)
            if bbox is None:
                raise OpInputError("crop to product: the product mask is empty (no product found)")
            x0, y0, x1, y1 = bbox
            mx, my = (x1 - x0) * c.margin, (y1 - y0) * c.margin
            bx0, by0 = max(0, int(x0 - mx)), max(0, int(y0 - my))
            bx1, by1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
        image = np.ascontiguousarray(item.image[by0:by1, bx0:bx1])
        mask = np.ascontiguousarray(item.mask[by0:by1, bx0:bx1]) if has_mask(item.mask) else item.mask
        return item.moved(image, mask, translate_step(-bx0, -by0))


def mask_bbox(mask: np.ndarray, threshold: int = 128) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of mask >= threshold, x1/y1 exclusive; None when empty."""
    on = mask >= threshold
    rows, cols = np.flatnonzero(on.any(axis=1)), np.flatnonzero(on.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1
