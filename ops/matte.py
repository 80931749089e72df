"""From a segmentation model's probability maps to a soft product matte and a confidence.

The model looks at each photo several times (sizes around its trained one, mirrored and not);
the maps are averaged in the model's square frame. Then:

1. islands: components whose probability mass is under `min_island` of the largest are
   dropped, so a speck far from the product cannot stretch the product's box (compose and
   fit_channel place the product by its box);
2. the map is stretched back to the photo's own size and its edge follows the photo through a
   guided filter (the model works at ~320 px; catalog photos are 1000+ px);
3. a contrast ramp around 0.5 turns the probability into an alpha matte: the 0.5 crossing (the
   hard mask) stays where it was, the soft band narrows, so a cutout on white has no halo of the
   old backdrop.

`mask_confidence` (0..1) says how much the matte can be trusted. Its core is how sure the model
is about the region it calls product (the mean probability inside the 0.5 mask, over all
passes): a model that found one clear object is near 1 there; a map where several objects or a
textured scene compete is grey inside. Degenerate masks (nothing, a speck, the whole frame)
score 0 whatever the probabilities say. Measured on real photos in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# mean foreground probability -> confidence: linear between these two points, clipped. 0.5
# confidence sits at a mean of 0.88 (the gates' `min: 0.5`).
_FG_ZERO, _FG_FULL = 0.76, 1.0
_MIN_AREA = 0.002  # a mask smaller than this share of the frame is a speck, not a product
_MAX_AREA = 0.98  # a mask over this share of the frame found no background at all


@dataclasses.dataclass(frozen=True)
class Matte:
    alpha: np.ndarray  # H x W uint8 at the photo's size, 255 = product
    confidence: float


def fuse(maps: list[np.ndarray]) -> np.ndarray:
    """Average the passes' probability maps (all in the model's square frame)."""
    return np.mean(np.stack(maps), axis=0).astype(np.float32)


def mask_confidence(prob: np.ndarray) -> float:
    """0..1 trust in the mask that `prob > 0.5` gives (see the module docstring)."""
    fg = prob > 0.5
    share = float(fg.mean())
    if share < _MIN_AREA or share > _MAX_AREA:
        return 0.0
    mean_fg = float(prob[fg].mean())
    return float(np.clip((mean_fg - _FG_ZERO) / (_FG_FULL - _FG_ZERO), 0.0, 1.0))


def drop_islands(prob: np.ndarray, min_island: float) -> np.ndarray:
    """Zero the components of `prob > 0.5` (and their soft halo) whose probability mass is
    under `min_island` x the largest component's."""
    fg = (prob > 0.5).astype(np.uint8)
    n, labels = cv2.connectedComponents(fg, connectivity=8)
    if n <= 2 or min_island <= 0:
        return prob
    mass = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n)
    mass[0] = 0.0
    drop = mass < min_island * mass.max()
    drop[0] = False
    if not drop.any():
        return prob
    gone = cv2.dilate(drop[labels].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    keep_near = cv2.dilate((~drop[labels] & (labels > 0)).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    out = prob.copy()
    out[gone & ~keep_near] = 0.0
    return out


def to_matte(prob: np.ndarray, image: np.ndarray, *, refine_radius: int, ramp: float) -> np.ndarray:
    """The model-frame probability map as a uint8 alpha matte at `image`'s size."""
    h, w = image.shape[:2]
    full = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    if refine_radius:
        # Radius in photo pixels grows with the upsampling, so the filter spans the model's blur.
        r = max(1, int(round(refine_radius * max(h, w) / max(prob.shape))))
        guide = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32) * (1.0 / 255.0)
        full = cv2.ximgproc.guidedFilter(guide, full, r, 1e-3)
    if ramp > 0:
        full = (full - 0.5) / ramp + 0.5
    return np.clip(full * 255.0 + 0.5, 0, 255).astype(np.uint8)
