"""Full-reference image metrics, used by the fidelity scores and by the tests' ground truth."""

from __future__ import annotations

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab
from skimage.metrics import structural_similarity


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB for uint8 images, optionally inside a boolean mask."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    sq = diff**2
    if mask is not None:
        sq = sq[mask.astype(bool)]
    mse = float(sq.mean()) if sq.size else 0.0
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def ciede2000_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel CIEDE2000 colour difference between two sRGB uint8 images."""
    return deltaE_ciede2000(rgb2lab(a), rgb2lab(b))


def mean_ciede2000(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    if mask is not None:
        # Per-pixel colour maths on the masked pixels only (a product is often under half the
        # frame): the same values as masking the whole map afterwards.
        keep = mask.astype(bool)
        a, b = a[keep][:, None, :], b[keep][:, None, :]
    de = ciede2000_map(a, b) if a.size else np.zeros(0)
    return float(de.mean()) if de.size else float("nan")


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM on luminance-like grey, inside `mask` when given (the full SSIM map is masked)."""
    ga, gb = _grey(a), _grey(b)
    if min(ga.shape) < 7:
        return float("nan")
    _, smap = structural_similarity(ga, gb, data_range=255.0, full=True)
    if mask is not None:
        smap = smap[mask.astype(bool)]
    return float(smap.mean()) if smap.size else float("nan")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _grey(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img.astype(np.float64)
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
