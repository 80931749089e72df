"""From a segmentation model's probability maps to a soft product matte and a confidence.

The model looks at each photo several times (sizes around its trained one, mirrored and not);
the maps are averaged in the model's square frame. Then:

1. islands: components whose probability mass is under `min_island` of the largest are
   dropped, so a speck far from the product cannot stretch the product's box (compose and
   fit_channel place the product by its box);
2. the map is stretched back to the photo's own size and its edge follows the photo through a
   guided filter (the model works at ~320 px; catalog photos are 1000+ px);
3. a contrast ramp around `threshold` turns the probability into an alpha matte: alpha is 50%
   where the averaged probability is `threshold` (the hard mask's edge), and the soft band
   narrows, so a cutout on white has no halo of the old backdrop. The default threshold, 0.45,
   leans towards keeping faint parts of the product (a cut-off product is a worse listing than
   a sliver of backdrop); on real photos it measured +0.005 mean IoU over 0.5.

`mask_confidence` (0..1) says how much the matte can be trusted. Its core is how sure the model
is about the region it calls product (the mean of the averaged probability where it is over
0.5): a model that found one clear object is near 1 there; a map where several objects or a
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
# A piece cut by the frame is scenery unless it holds at least this share of the product's mass.
_FRAME_ISLAND = 0.5


@dataclasses.dataclass(frozen=True)
class Matte:
    alpha: np.ndarray  # H x W uint8 at the photo's size, 255 = product
    confidence: float


def fuse(maps: list[np.ndarray]) -> np.ndarray:
    """Average the passes' probability maps (all in the model's square frame)."""
    return np.mean(np.stack(maps), axis=0).astype(np.float32)


def mask_confidence(prob: np.ndarray) -> float:
    """0..1 trust in the averaged probability map (see the module docstring)."""
    fg = prob > 0.5
    share = float(fg.mean())
    if share < _MIN_AREA or share > _MAX_AREA:
        return 0.0
    mean_fg = float(prob[fg].mean())
    return float(np.clip((mean_fg - _FG_ZERO) / (_FG_FULL - _FG_ZERO), 0.0, 1.0))


def drop_islands(prob: np.ndarray, min_island: float, threshold: float = 0.5) -> np.ndarray:
    """Zero the components of `prob > threshold` (and their soft halo) that are not the product:
    those whose probability mass is under `min_island` x the largest component's, and, when
    the largest component stands free of the frame, those that touch the frame and are not
    comparable to it (scenery cut by the edge: a window, a rock, a table corner)."""
    fg = (prob > threshold).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 2 or min_island <= 0:
        return prob
    mass = np.bincount(labels.ravel(), weights=prob.ravel(), minlength=n)
    mass[0] = 0.0
    h, w = prob.shape
    x, y, bw, bh = stats[:, 0], stats[:, 1], stats[:, 2], stats[:, 3]
    at_frame = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    main = int(np.argmax(mass))
    drop = mass < min_island * mass[main]
    if not at_frame[main]:
        drop |= at_frame & (mass < _FRAME_ISLAND * mass[main])
    drop[0] = drop[main] = False
    if not drop.any():
        return prob
    gone = cv2.dilate(drop[labels].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    keep_near = cv2.dilate((~drop[labels] & (labels > 0)).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    out = prob.copy()
    out[gone & ~keep_near] = 0.0
    return out


def to_matte(prob: np.ndarray, image: np.ndarray, *, refine_radius: int, ramp: float, threshold: float = 0.5) -> np.ndarray:
    """The model-frame probability map as a uint8 alpha matte at `image`'s size."""
    h, w = image.shape[:2]
    # The ramp and the 8-bit rounding fold into one affine map of the filtered probability.
    gain, offset = (1.0 / ramp, 0.5 - threshold / ramp) if ramp > 0 else (1.0, 0.0)
    gain, offset = 255.0 * gain, 255.0 * offset + 0.5
    if not refine_radius:
        full = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(full * gain + offset, 0, 255).astype(np.uint8)
    # Radius in photo pixels grows with the upsampling, so the filter spans the model's blur.
    r = max(1, int(round(refine_radius * max(h, w) / max(prob.shape))))
    return fast_guided_matte(prob, cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), r, 1e-3, gain, offset)


def fast_guided_matte(prob: np.ndarray, grey: np.ndarray, radius: int, eps: float, gain: float, offset: float) -> np.ndarray:
    """uint8 of `gain * guided_filter(grey, prob upsampled, radius, eps) + offset`, the filter's
    coefficients computed at a subsampled size (He & Sun's fast guided filter, 2015).

    The guided filter's output is a * grey + b with a and b box-averaged, so smooth: they are
    fitted on a copy subsampled to ~4 pixels per radius and only they are upsampled; the edge
    itself comes from the full-size guide. On 1280-2048 px photos the matte costs ~1/4 of the
    full-size filter's. Against it on real photos: the soft band within 2-12 levels on
    average, the hard mask to IoU >= 0.998, and on ../shared/segmentation the same IoU against
    human masks (tests/ops/test_cheaper_ops.py, docs/benchmarks.md)."""
    h, w = grey.shape
    sub = max(1.0, radius / 4.0)
    sw, sh = max(1, round(w / sub)), max(1, round(h / sub))
    r = max(1, round(radius / sub))
    guide = cv2.resize(grey, (sw, sh), interpolation=cv2.INTER_AREA).astype(np.float32) * (1.0 / 255.0)
    p = cv2.resize(prob, (sw, sh), interpolation=cv2.INTER_AREA if prob.shape[0] > sh else cv2.INTER_LINEAR)
    box = (2 * r + 1, 2 * r + 1)
    mean_i, mean_p = cv2.blur(guide, box), cv2.blur(p, box)
    cov_ip = cv2.blur(guide * p, box) - mean_i * mean_p
    var_i = cv2.blur(guide * guide, box) - mean_i * mean_i
    a = cov_ip / (var_i + eps)
    b = mean_p - a * mean_i
    # Folded: the guide stays 8-bit (the 1/255 goes into a), the ramp and rounding into both.
    a = cv2.blur(a, box) * (gain / 255.0)
    b = cv2.blur(b, box) * gain + offset
    a_full = cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)
    out = cv2.resize(b, (w, h), interpolation=cv2.INTER_LINEAR)
    out += a_full * grey
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
