"""Overlays: remove text / watermark overlays by inpainting, and stamp a visible watermark."""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from ops.base import Item, Op, OpConfig, OpInputError, has_mask
from ops.registry import register

# The batch column that carries a given overlay mask (HxW uint8, 255 = overlay), e.g. one a
# retoucher drew, loaded by the pipeline from the manifest's `overlay_mask_uri`.
OVERLAY_MASK_COLUMN = "overlay_mask"


class RemoveOverlayConfig(OpConfig):
    mask: Literal["given", "detect", "given_or_detect"] = "given_or_detect"
    method: Literal["telea", "navier_stokes"] = "telea"
    radius: int = Field(5, ge=1, le=50, description="inpainting neighbourhood in pixels")
    dilate: int = Field(2, ge=0, le=30, description="grow the mask by this many pixels to cover anti-aliased edges")
    detect_sensitivity: float = Field(3.0, gt=0, le=20, description="detection threshold in robust sigmas (lower finds more)")
    detect_max_stroke: int = Field(9, ge=2, le=64, description="widest stroke (px) detection looks for")


@register
class RemoveOverlay(Op):
    name = "remove_overlay"
    version = "1"
    Config = RemoveOverlayConfig

    def apply(self, item: Item) -> Item:
        region = overlay_region(item, self.config)
        if region is None:
            return item
        flag = cv2.INPAINT_TELEA if self.config.method == "telea" else cv2.INPAINT_NS
        return item.with_image(cv2.inpaint(item.image, region, self.config.radius, flag))


def overlay_region(item: Item, c: RemoveOverlayConfig) -> np.ndarray | None:
    """The (dilated) uint8 region to repaint for a row, or None when there is nothing to do:
    the row's given overlay mask, or a detected one, as the config's `mask` mode says."""
    given = item.context.get(OVERLAY_MASK_COLUMN)
    if c.mask != "detect" and given is not None and has_mask(np.asarray(given)):
        region = np.asarray(given)
        if region.shape != item.image.shape[:2]:
            raise OpInputError(
                f"overlay mask is {region.shape[1]}x{region.shape[0]} but the image is "
                f"{item.image.shape[1]}x{item.image.shape[0]}; masks must match the source photo"
            )
    elif c.mask == "given":
        return None  # only rows whose manifest names an overlay_mask_uri are retouched
    else:
        region = detect_overlay(item.image, c.detect_sensitivity, c.detect_max_stroke)
    region = (region >= 128).astype(np.uint8) * 255
    if not region.any():
        return None
    if c.dilate:
        region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * c.dilate + 1,) * 2))
    return region


def detect_overlay(image: np.ndarray, sensitivity: float = 3.0, max_stroke: int = 9) -> np.ndarray:
    """Weight-free detector for overlaid text and watermarks.

    Overlays are thin strokes that are brighter (white watermark) or darker than their
    surroundings and nearly colourless. Morphological top-hats with a kernel wider than the
    strokes isolate them; a robust (MAD) threshold keeps the strongest; strokes are then
    joined into word-shaped groups, and blobs that are not stroke-like (too thick, too round
    or too large) are dropped, which keeps most product edges and photo texture out."""
    # In 8 bits throughout: top-hats of an 8-bit image are whole numbers anyway, and
    # medians of whole numbers come from a 256-bin histogram instead of a sort.
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * max_stroke + 1,) * 2)
    bright = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, k)
    dark = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, k)
    colourless = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1] < 90
    out = np.zeros(grey.shape, np.uint8)
    for resp in (bright, dark):
        counts = np.bincount(resp.ravel(), minlength=256)
        med = _median_of_counts(counts)
        # |resp - med| for every level at once; its median from the same counts.
        dev = np.abs(np.arange(256) - med)
        order = np.argsort(dev, kind="stable")
        mad = _median_of_sorted_counts(dev[order], counts[order]) * 1.4826 + 1e-3
        strokes = ((resp > max(12.0, med + sensitivity * 3 * mad)) & colourless).astype(np.uint8)
        out |= _stroke_like(strokes, max_stroke)
    return out * 255


def _median_of_counts(counts: np.ndarray) -> float:
    """np.median of the values 0..255 held `counts[v]` times each."""
    return _median_of_sorted_counts(np.arange(len(counts), dtype=np.float64), counts)


def _median_of_sorted_counts(values: np.ndarray, counts: np.ndarray) -> float:
    """np.median of `values` (ascending) each repeated `counts` times: the middle one, or
    the mean of the middle two for an even total."""
    total = int(counts.sum())
    cum = np.cumsum(counts)
    lo = values[int(np.searchsorted(cum, (total - 1) // 2, side="right"))]
    hi = values[int(np.searchsorted(cum, total // 2, side="right"))]
    return float(lo + hi) / 2.0


def _stroke_like(strokes: np.ndarray, max_stroke: int) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
    frame = strokes.size
    dist = cv2.distanceTransform(strokes, cv2.DIST_L2, 3)
    # Thickness of each component = 2 x its largest inscribed radius (stroke pixels only:
    # everywhere else both the label and the distance are 0).
    thick = np.zeros(n, np.float32)
    on = strokes.astype(bool)
    np.maximum.at(thick, labels[on], dist[on])
    area = stats[:, cv2.CC_STAT_AREA]
    fill = area / np.maximum(1, stats[:, cv2.CC_STAT_WIDTH] * stats[:, cv2.CC_STAT_HEIGHT])
    keep = (area >= 8) & (area <= 0.02 * frame) & (2 * thick <= max_stroke + 1) & (fill < 0.75)
    keep[0] = False
    kept = keep[labels].astype(np.uint8)
    # Letters of one word sit close together: keep only components that have neighbours, since
    # a lone thin curve is more likely a product edge than text.
    joined = cv2.dilate(kept, np.ones((1, 3 * max_stroke), np.uint8))
    m, groups = cv2.connectedComponents(joined, connectivity=8)
    # Count the distinct stroke components inside each group.
    members = np.zeros(m, np.int32)
    on = kept > 0
    pairs = np.unique(groups[on].astype(np.int64) * n + labels[on])  # (group, component) as one key
    np.add.at(members, pairs // n, 1)
    wordy = members >= 3
    wordy[0] = False
    return (kept & wordy[groups]).astype(np.uint8)


class StampWatermarkConfig(OpConfig):
    text: str = Field(..., min_length=1, max_length=200)
    opacity: float = Field(0.35, gt=0, le=1)
    position: Literal["center", "bottom_right", "bottom_left", "top_right", "top_left", "tile"] = "bottom_right"
    scale: float = Field(0.05, gt=0, le=0.5, description="text height as a fraction of the image height")
    color: tuple[int, int, int] = (255, 255, 255)


@register
class StampWatermark(Op):
    """A visible text watermark (for previews and sample sheets)."""

    name = "stamp_watermark"
    version = "1"
    Config = StampWatermarkConfig

    def apply(self, item: Item) -> Item:
        return item.with_image(stamp_text(item.image, self.config))


def stamp_text(image: np.ndarray, c: StampWatermarkConfig) -> np.ndarray:
    h, w = image.shape[:2]
    font = cv2.FONT_HERSHEY_DUPLEX
    (tw1, th1), _ = cv2.getTextSize(c.text, font, 1.0, 2)
    fs = max(0.2, c.scale * h / max(th1, 1))
    thickness = max(1, round(fs * 2))
    (tw, th), base = cv2.getTextSize(c.text, font, fs, thickness)
    layer = np.zeros((h, w), np.uint8)
    pad = round(0.03 * min(h, w))
    anchors = {
        "center": [((w - tw) // 2, (h + th) // 2)],
        "bottom_right": [(w - tw - pad, h - pad - base)],
        "bottom_left": [(pad, h - pad - base)],
        "top_right": [(w - tw - pad, pad + th)],
        "top_left": [(pad, pad + th)],
        "tile": [(x, y) for y in range(th + pad, h, 3 * th + pad) for x in range(pad - (y // 3) % max(1, tw), w, tw + 2 * pad)],
    }
    for org in anchors[c.position]:
        cv2.putText(layer, c.text, org, font, fs, 255, thickness, cv2.LINE_AA)
    a = (layer.astype(np.float32) / 255.0 * c.opacity)[..., None]
    out = image.astype(np.float32) * (1 - a) + np.asarray(c.color, np.float32) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
