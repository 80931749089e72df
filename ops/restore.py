"""Restoration: denoise (non-local means) and sharpen (unsharp mask)."""

from __future__ import annotations

import functools
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from ops.base import Item, Op, OpConfig, OpInputError, has_mask
from ops.geometry import mask_bbox
from ops.registry import register
from ops.scores import noise_sigma


# Search window by noise level (version 4): a narrow search below sigma 5, where real photos'
# texture is most of what the estimate sees, and the wide one above it, where true noise needs
# more candidate patches.
_NARROW_SEARCH, _WIDE_SEARCH, _WIDE_SEARCH_FROM = 7, 11, 5.0


class DenoiseConfig(OpConfig):
    strength: float | None = Field(None, gt=0, le=50, description="NLM filter strength h; default: from the estimated noise")
    min_sigma: float = Field(1.5, ge=0, description="skip images whose estimated noise sigma is below this")
    template_window: int = Field(7, ge=3, le=21)
    search_window: int | None = Field(
        None, ge=5, le=61,
        description=f"NLM search window on the luminance (cost grows with its square); default {_NARROW_SEARCH} below noise sigma {_WIDE_SEARCH_FROM:g}, {_WIDE_SEARCH} from it",
    )
    region: Literal["frame", "product"] = Field(
        "frame",
        description="frame: every pixel; product: only the product mask's box (put remove_background first), for recipes that replace the background anyway",
    )


@register
class Denoise(Op):
    """Non-local means, luminance at full resolution, colour at half.

    When no strength is given, h follows the estimated noise sigma (h ~= 1.1 sigma worked best
    on the synthetic catalog's Gaussian noise), and clean images are passed through untouched
    so the op is safe to put in every enhancement recipe.

    Why not OpenCV's fastNlMeansDenoisingColored with a 21 px search (version 1): at 4 MP it
    cost ~7.6 s per photo on one core. Chroma carries little detail, so it is filtered at a
    quarter of the pixels, and an 11 px search on the luminance loses little (PSNR gains
    within ~1 dB of version 1 on the synthetic catalog, better on real photos whose texture
    the wide search smeared; tests/ops/test_cheaper_ops.py) at ~1/5 of the cost.

    Why a 7 px search below sigma 5 (version 4): on real photos (../shared/photos at half
    size, plus Gaussian noise of sigma 1 to 9) it kept more of the photo in every textured
    case (up to +1.5 dB PSNR against the photo) and was within 0.3 dB on smooth products, at
    half the cost (docs/benchmarks.md). Real catalog photos that get denoised at all mostly
    estimate sigma 1.5 to 4. On the synthetic catalog's smooth renders with sigma 6 to 9
    noise the wide search gains ~1 dB more, so it stays above sigma 5."""

    name = "denoise"
    # 3: odd-sized frames' chroma is resized by exactly 2x (even sizes: same pixels as 2).
    # 4: a 7 px search window instead of 11 below noise sigma 5 (half the cost; see the class docstring).
    # 5: the noise estimate reads texture and clipped backdrops less as noise (ops/scores.py:noise_sigma).
    version = "5"
    Config = DenoiseConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        self.check_item(item)
        sigma = noise_sigma(cv2.cvtColor(item.image, cv2.COLOR_RGB2GRAY))
        if c.strength is None and sigma < c.min_sigma:
            return item
        h = c.strength if c.strength is not None else float(np.clip(1.1 * sigma, 2.0, 30.0))
        search = c.search_window or (_WIDE_SEARCH if sigma >= _WIDE_SEARCH_FROM else _NARROW_SEARCH)
        tw, sw = c.template_window | 1, search | 1
        if c.region == "frame":
            return item.with_image(nlm_denoise(item.image, h, template_window=tw, search_window=sw))
        return item.with_image(_denoise_product(item, h, template_window=tw, search_window=sw))

    def check_item(self, item: Item) -> None:
        if self.config.region == "product" and not has_mask(item.mask):
            raise OpInputError("denoise with region: product needs the product mask; put remove_background before denoise in the recipe")


def _denoise_product(item: Item, h: float, *, template_window: int, search_window: int) -> np.ndarray:
    """NLM on the product's box only (every pixel the matte touches, plus the filter's reach),
    the rest of the frame as it was. Inside the box the pixels equal a whole-frame run's: the
    margin covers the search and template windows (twice: chroma runs at half size), and the
    crop starts and ends on even coordinates (or the frame's edge, which `nlm_denoise` pads
    the same way) so the half-size chroma pass samples the same 2x2 cells. A marketplace main
    image keeps nothing outside the matte, and the product is often half the frame or less."""
    box = mask_bbox(item.mask, threshold=1)
    if box is None:
        return item.image
    rows, cols = item.image.shape[:2]
    # Twice the windows' reach: the chroma pass runs at half size.
    reach = 2 * (search_window // 2 + template_window // 2) + 4
    x0, y0 = max(0, (box[0] - reach) & ~1), max(0, (box[1] - reach) & ~1)
    x1, y1 = min(cols, (box[2] + reach + 1) & ~1), min(rows, (box[3] + reach + 1) & ~1)
    out = item.image.copy()
    out[y0:y1, x0:x1] = nlm_denoise(np.ascontiguousarray(item.image[y0:y1, x0:x1]), h, template_window=template_window, search_window=search_window)
    return out


def nlm_denoise(image: np.ndarray, h: float, *, template_window: int, search_window: int) -> np.ndarray:
    """NLM on YCrCb: Y at full size with strength h; Cr and Cb at half size with 0.6 h (chroma
    noise is averaged down by the resize), then back up."""
    ycc = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)
    y = cv2.fastNlMeansDenoising(np.ascontiguousarray(ycc[..., 0]), None, h, template_window, search_window)
    rows, cols = image.shape[:2]
    if min(rows, cols) >= 32:
        # An odd side gets one replicated row/column, so both resizes are exactly 2x and a
        # crop of the frame (region: product) sees the same chroma as the whole frame.
        even = cv2.copyMakeBorder(np.ascontiguousarray(ycc[..., 1:]), 0, rows % 2, 0, cols % 2, cv2.BORDER_REPLICATE)
        half = cv2.resize(even, (even.shape[1] // 2, even.shape[0] // 2), interpolation=cv2.INTER_AREA)
        chroma = [cv2.fastNlMeansDenoising(np.ascontiguousarray(half[..., k]), None, 0.6 * h, 5, search_window) for k in (0, 1)]
        crcb = cv2.resize(np.dstack(chroma), (even.shape[1], even.shape[0]), interpolation=cv2.INTER_LINEAR)[:rows, :cols]
    else:
        crcb = ycc[..., 1:]
    return cv2.cvtColor(np.dstack([y, crcb]), cv2.COLOR_YCrCb2RGB)


class SharpenConfig(OpConfig):
    amount: float = Field(0.6, ge=0, le=5, description="how much of the detail layer to add back")
    radius: float = Field(1.2, gt=0, le=20, description="Gaussian sigma in pixels")
    threshold: int = Field(2, ge=0, le=255, description="ignore detail smaller than this (keeps noise down)")


@register
class Sharpen(Op):
    name = "sharpen"
    version = "2"  # 2: 8-bit arithmetic (a whole-level blur; outputs within one level of version 1)
    Config = SharpenConfig

    def apply(self, item: Item) -> Item:
        c = self.config
        # Unsharp masking in 8 bits: the detail layer split by sign (saturating subtracts), each
        # half scaled, rounded and thresholded by one lookup table, added back with saturation.
        # The same as version 1's float32 `round(img + amount * where(|d| < threshold, 0, d))`
        # but for the blur, which OpenCV rounds to whole levels: outputs move by at most one
        # level at the recipes' amounts (tests/ops/test_cheaper_ops.py), at ~1/3 of the cost.
        img = item.image
        blur = cv2.GaussianBlur(img, (0, 0), c.radius)
        up, down = _detail_luts(c.amount, c.threshold)
        out = cv2.add(img, cv2.LUT(cv2.subtract(img, blur), up))
        return item.with_image(cv2.subtract(out, cv2.LUT(cv2.subtract(blur, img), down), dst=out))


@functools.lru_cache(maxsize=16)
def _detail_luts(amount: float, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """What a detail of d levels adds (brighter side) and takes away (darker side): amount x d,
    rounded half up as img + amount * d + 0.5 truncates, zero under the threshold."""
    d = np.arange(256, dtype=np.float64)
    keep = d >= threshold
    up = np.where(keep, np.minimum(255, np.floor(amount * d + 0.5)), 0).astype(np.uint8)
    down = np.where(keep, np.minimum(255, np.ceil(amount * d - 0.5)), 0).astype(np.uint8)
    return up, down
