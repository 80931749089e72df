"""Full-reference image metrics, used by the fidelity scores and by the tests' ground truth."""

from __future__ import annotations

import numpy as np
from skimage import img_as_float
from skimage.color import deltaE_ciede2000, rgb2lab, xyz2lab
from skimage.color.colorconv import xyz_from_rgb
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
    return deltaE_ciede2000(srgb_to_lab(a), srgb_to_lab(b))


def _linear_lut() -> np.ndarray:
    """sRGB uint8 -> linear float64, computed by skimage's own rgb2xyz steps on every level."""
    arr = img_as_float(np.arange(256, dtype=np.uint8))
    mask = arr > 0.04045
    arr[mask] = np.power((arr[mask] + 0.055) / 1.055, 2.4)
    arr[~mask] /= 12.92
    return arr


_SRGB_LINEAR = _linear_lut()


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """skimage's rgb2lab, bit for bit, for uint8 input: the sRGB decoding (a power per
    channel value, most of rgb2lab's cost) is a 256-entry table. Other dtypes go to rgb2lab."""
    if rgb.dtype != np.uint8:
        return rgb2lab(rgb)
    return xyz2lab(_SRGB_LINEAR[rgb] @ xyz_from_rgb.T.astype(np.float64))


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
