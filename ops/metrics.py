"""Full-reference image metrics, used by the fidelity scores and by the tests' ground truth."""

from __future__ import annotations

import cv2
import numpy as np
from skimage import img_as_float
from skimage.color import deltaE_ciede2000, rgb2lab, xyz2lab, xyz_tristimulus_values
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
    """Per-pixel CIEDE2000 colour difference between two sRGB images (H x W x 3 or N x 3).

    uint8 input (every score) goes through `_ciede2000_u8`: skimage's formula in float32, with
    the hue harmonics from one sine and one cosine. It is 2.5-8x faster than skimage's float64
    and within 0.004 of it (2e-4 relative) on every pair tested, where a visible difference is
    ~1; a mean over many pixels moves by ~1e-6 (real photos) to 4e-5 (flat synthetic colours) (tests/ops/test_cheaper_ops.py). Other dtypes go to skimage."""
    if a.dtype == np.uint8 and b.dtype == np.uint8:
        shape = a.shape[:-1]
        return _ciede2000_u8(a.reshape(-1, 3), b.reshape(-1, 3)).reshape(shape)
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


_SRGB_LINEAR32 = _SRGB_LINEAR.astype(np.float32)
# sRGB linear -> XYZ already divided by the white rgb2lab uses (D65, 2 degrees), so Lab's f()
# applies directly.
_XYZ_WHITE = xyz_tristimulus_values(illuminant="D65", observer="2")
_LINEAR_TO_XYZN = (xyz_from_rgb / _XYZ_WHITE[:, None]).T.astype(np.float32)
_25_POW_7 = np.float32(25.0**7)
_TWO_PI = np.float32(2 * np.pi)
_PI = np.float32(np.pi)
# T(H)'s phase shifts (30, 6 and 63 degrees) as cosine and sine.
_COS30, _SIN30 = np.float32(np.cos(np.deg2rad(30))), np.float32(np.sin(np.deg2rad(30)))
_COS6, _SIN6 = np.float32(np.cos(np.deg2rad(6))), np.float32(np.sin(np.deg2rad(6)))
_COS63, _SIN63 = np.float32(np.cos(np.deg2rad(63))), np.float32(np.sin(np.deg2rad(63)))


def _lab_u8(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L, a, b (float32) of N x 3 uint8 sRGB, as skimage's rgb2lab computes them."""
    # cv2.transform is the 3x3 product per pixel, SIMD (numpy's matmul with an inner size of 3 is ~4x slower).
    xyz = cv2.transform(_SRGB_LINEAR32[rgb].reshape(-1, 1, 3), _LINEAR_TO_XYZN.T).reshape(-1, 3)
    # Cube root as exp(log/3): the same to float32 rounding, and ~3x cheaper than np.cbrt.
    f = np.exp(np.log(np.maximum(xyz, np.float32(1e-30))) * np.float32(1 / 3))
    low = xyz <= 0.008856
    if low.any():
        f[low] = np.float32(7.787) * xyz[low] + np.float32(16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)


def _pow7(x: np.ndarray) -> np.ndarray:
    x2 = x * x
    return x2 * x2 * x2 * x


def _hue(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    h = np.arctan2(b, a)
    h[h < 0] += _TWO_PI
    return h


def _ciede2000_u8(rgb1: np.ndarray, rgb2: np.ndarray) -> np.ndarray:
    """CIEDE2000 (kL = kC = kH = 1) of N x 3 uint8 pairs: skimage's `deltaE_ciede2000`, step
    for step, in float32."""
    L1, a1, b1 = _lab_u8(rgb1)
    L2, a2, b2 = _lab_u8(rgb2)
    # 1. Stretch a* by the mean chroma, then polar (C', h') in the stretched plane.
    c7 = _pow7(0.5 * (np.sqrt(a1 * a1 + b1 * b1) + np.sqrt(a2 * a2 + b2 * b2)))
    scale = 1.5 - 0.5 * np.sqrt(c7 / (c7 + _25_POW_7))
    a1, a2 = a1 * scale, a2 * scale
    C1, C2 = np.sqrt(a1 * a1 + b1 * b1), np.sqrt(a2 * a2 + b2 * b2)
    h1, h2 = _hue(a1, b1), _hue(a2, b2)
    # 2. Lightness and chroma terms.
    tmp = (0.5 * (L1 + L2) - 50) ** 2
    L_term = (L2 - L1) / (1 + 0.015 * tmp / np.sqrt(20 + tmp))
    Cbar = 0.5 * (C1 + C2)
    C_term = (C2 - C1) / (1 + 0.045 * Cbar)
    # 3. Hue difference and mean hue, wrapped; a grey (C' = 0) has no hue.
    h_diff, h_sum, CC = h2 - h1, h1 + h2, C1 * C2
    grey = CC == 0
    dH = h_diff.copy()
    dH[h_diff > _PI] -= _TWO_PI
    dH[h_diff < -_PI] += _TWO_PI
    dH[grey] = 0
    dH_term = 2 * np.sqrt(CC) * np.sin(dH / 2)
    Hbar = h_sum.copy()
    wrap = ~grey & (np.abs(h_diff) > _PI)
    Hbar[wrap & (h_sum < _TWO_PI)] += _TWO_PI
    Hbar[wrap & (h_sum >= _TWO_PI)] -= _TWO_PI
    Hbar[grey] *= 2
    Hbar *= 0.5
    # 4. T(H) = 1 - .17cos(H-30) + .24cos(2H) + .32cos(3H+6) - .20cos(4H-63), the multiple
    #    angles from cos H and sin H (four cosines of large arrays cost more than the rest).
    c1, s1 = np.cos(Hbar), np.sin(Hbar)
    c2, s2 = 2 * c1 * c1 - 1, 2 * s1 * c1
    c3, s3 = c1 * (2 * c2 - 1), s1 * (2 * c2 + 1)
    c4, s4 = 2 * c2 * c2 - 1, 2 * s2 * c2
    T = 1 - 0.17 * (c1 * _COS30 + s1 * _SIN30) + 0.24 * c2 + 0.32 * (c3 * _COS6 - s3 * _SIN6) - 0.20 * (c4 * _COS63 + s4 * _SIN63)
    H_term = dH_term / (1 + 0.015 * Cbar * T)
    # 5. Hue rotation, then the sum.
    c7 = _pow7(Cbar)
    Rc = 2 * np.sqrt(c7 / (c7 + _25_POW_7))
    dtheta = np.float32(np.deg2rad(30)) * np.exp(-(((Hbar * np.float32(180 / np.pi) - 275) / 25) ** 2))
    R_term = -np.sin(2 * dtheta) * Rc * C_term * H_term
    return np.sqrt(np.maximum(L_term**2 + C_term**2 + H_term**2 + R_term, 0))



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
