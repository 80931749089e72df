"""Restoration: denoise (non-local means) and sharpen (unsharp mask)."""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import Field

from ops.base import Item, Op, OpConfig
from ops.registry import register
from ops.scores import noise_sigma


class DenoiseConfig(OpConfig):
    strength: float | None = Field(None, gt=0, le=50, description="NLM filter strength h; default: from the estimated noise")
    min_sigma: float = Field(1.5, ge=0, description="skip images whose estimated noise sigma is below this")
    template_window: int = Field(7, ge=3, le=21)
    search_window: int = Field(21, ge=5, le=61)


@register
class Denoise(Op):
    """OpenCV fast non-local means on colour images.

    When no strength is given, h follows the estimated noise sigma (h ~= 1.1 sigma worked best
    on the synthetic catalog's Gaussian noise), and clean images are passed through untouched
    so the op is safe to put in every enhancement recipe."""

    name = "denoise"
    version = "1"
    Config = DenoiseConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        sigma = noise_sigma(cv2.cvtColor(item.image, cv2.COLOR_RGB2GRAY))
        if c.strength is None and sigma < c.min_sigma:
            return item
        h = c.strength if c.strength is not None else float(np.clip(1.1 * sigma, 2.0, 30.0))
        out = cv2.fastNlMeansDenoisingColored(
            item.image, None, h=h, hColor=h, templateWindowSize=c.template_window | 1, searchWindowSize=c.search_window | 1
        )
        return item.with_image(out)


class SharpenConfig(OpConfig):
    amount: float = Field(0.6, ge=0, le=5, description="how much of the detail layer to add back")
    radius: float = Field(1.2, gt=0, le=20, description="Gaussian sigma in pixels")
    threshold: int = Field(2, ge=0, le=255, description="ignore detail smaller than this (keeps noise down)")


@register
class Sharpen(Op):
    name = "sharpen"
    version = "1"
    Config = SharpenConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        img = item.image.astype(np.float32)
        blurred = cv2.GaussianBlur(img, (0, 0), c.radius)
        detail = img - blurred
        if c.threshold:
            detail = np.where(np.abs(detail) < c.threshold, 0.0, detail)
        out = np.clip(img + c.amount * detail + 0.5, 0, 255).astype(np.uint8)
        return item.with_image(out)
