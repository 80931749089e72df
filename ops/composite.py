"""Put the product's own pixels back over a generated image.

Generative models repaint what they are given; a product whose label garbles or whose colour
drifts is worse than no image. So after every generative op the source pixels are composited
back through the product mask: inside the mask (eroded by `feather_px`) the output IS the
source, and a ramp `feather_px` wide across the mask edge blends into the generated scene.
The fidelity score (CIEDE2000 and SSIM inside the eroded mask) measures exactly this region.
"""

from __future__ import annotations

import cv2
import numpy as np

from ops.base import OpInputError, has_mask


def product_core(mask: np.ndarray, op_name: str) -> np.ndarray:
    """The hard product region (bool), or a row error when there is none."""
    if not has_mask(mask):
        raise OpInputError(f"{op_name} needs a product mask; put remove_background before {op_name} in the recipe")
    core = mask >= 128
    if not core.any():
        raise OpInputError(f"{op_name}: the product mask is empty (no product found)")
    return core


def feather_alpha(core: np.ndarray, feather_px: float) -> np.ndarray:
    """1.0 at >= feather_px inside the product, ramping to 0 at its edge, 0 outside."""
    if feather_px <= 0:
        return core.astype(np.float32)
    inside = cv2.distanceTransform(core.astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(inside / float(feather_px), 0.0, 1.0).astype(np.float32)


def repaint_mask(alpha: np.ndarray) -> np.ndarray:
    """uint8 mask (255 = let the model paint) from a feather alpha: everything but the
    product's inner core, so the generated background runs under the feather ramp and no old
    background shows through."""
    return np.where(alpha >= 1.0, 0, 255).astype(np.uint8)


def paste_product(generated: np.ndarray, source: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """alpha * source + (1 - alpha) * generated; bit-exact source where alpha == 1. Only the
    thin ramp is blended in floating point (this runs on the GPU worker between batches)."""
    if generated.shape != source.shape:
        raise ValueError(f"paste_product: generated {generated.shape} and source {source.shape} differ")
    out = generated.copy()
    full = alpha >= 1.0
    out[full] = source[full]
    band = (alpha > 0) & ~full
    a = alpha[band][:, None]
    out[band] = np.clip(source[band] * a + generated[band] * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)
    return out
