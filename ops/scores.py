"""Weight-free quality scores computed on every output variant.

All scores are plain floats (`score_*` columns) so they can be thresholded by a recipe gate and
aggregated in reports. The perceptual hash is a 16-hex-digit string (`phash`), since it is an
identity, not a magnitude.
"""

from __future__ import annotations

import cv2
import numpy as np

from ops.base import has_mask, identity_affine
from ops.metrics import mean_ciede2000, ssim

SCORE_NAMES = (
    "score_sharpness",
    "score_noise_sigma",
    "score_exposure_shadows_clipped",
    "score_exposure_highlights_clipped",
    "score_colorfulness",
    "score_width",
    "score_height",
    "score_fidelity_ssim",
    "score_fidelity_ciede2000",
    # Model-based, when the recipe configures them (ops/quality_models.py); null otherwise.
    "score_brisque",
    "score_niqe",
    "score_clip",
    "score_aesthetic",
    "score_unsafe",  # > 0: a safety model flagged the variant; it never passes its gate
    # Measured by ops on the way (Item.scores); null when no op measured it.
    "score_mask_confidence",  # remove_background: 0..1 trust in the product mask (ops/matte.py)
)

# Sharpness is resolution dependent; measure it at one reference size so a 4000 px photo and
# an 800 px photo are comparable.
_SHARPNESS_SIDE = 1024


def quality_scores(
    image: np.ndarray,
    *,
    source: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    affine: np.ndarray | None = None,
) -> dict[str, float | str]:
    """Scores for one output image. Fidelity needs the decoded `source` and the `affine` that
    maps source pixels to output pixels; it is measured inside the product `mask` (or the
    whole frame when there is none)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    scores: dict[str, float | str] = {
        "score_sharpness": sharpness(grey),
        "score_noise_sigma": noise_sigma(grey),
        "score_exposure_shadows_clipped": float((grey <= 2).mean()),
        "score_exposure_highlights_clipped": float((grey >= 253).mean()),
        "score_colorfulness": colorfulness(image),
        "score_width": float(w),
        "score_height": float(h),
        "score_fidelity_ssim": float("nan"),
        "score_fidelity_ciede2000": float("nan"),
        "phash": phash(grey),
    }
    if source is not None and affine is not None:
        scores.update(fidelity(image, source, mask, affine))
    return scores


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian at a 1024 px reference size."""
    scale = _SHARPNESS_SIDE / max(grey.shape)
    if scale < 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


# Noise and colourfulness are statistics over pixels: past ~1 MP more pixels do not change
# them, so large images are measured on a sample (tiles at full resolution for noise, which
# downscaling would average away; a strided grid for colour).
_SAMPLE_PIXELS = 1_000_000
_NOISE_TILES = 4  # per side: 4 x 4 tiles spread over the frame


def noise_sigma(grey: np.ndarray) -> float:
    """Gaussian noise sigma estimate (Immerkaer 1996, 'Fast noise variance estimation'), made
    robust to texture and clipping.

    1. The frame is measured in 4 x 4 tiles at full resolution (for images over ~1 MP, tiles
       spread over the frame that hold ~1 MP together; smaller images are cut into 16).
    2. Per tile, the plain estimator over pixels away from strong edges (Sobel magnitude below
       the tile's 90th percentile), as is usual. Pixels whose 3 x 3 neighbourhood is dead flat
       or touches 0 or 255 are left out: clipping removes the noise there and a digitally flat
       backdrop has none, so counting them read a noisy product cut out onto white as nearly
       clean (sigma 6 read as 1.0). A tile with under 5% such pixels left says nothing.
    3. The image's sigma is the lower quartile of its tiles' estimates. Sensor noise covers the
       frame; texture (knit, wax, wood grain), which the estimator cannot tell from noise, fills
       only part of it. Pooling every tile read 8 of 37 clean real photos over 1 MP as noisy
       (sigma 1.5-6.2, so `denoise` smoothed their texture); the quartile reads 2
       (docs/benchmarks.md)."""
    if min(grey.shape) < 3:
        return 0.0
    estimates = [e for e in (_tile_noise(tile) for tile in _noise_tiles(grey)) if e is not None]
    return float(np.percentile(estimates, 25)) if estimates else 0.0


def _tile_noise(tile: np.ndarray) -> float | None:
    if min(tile.shape) < 3:
        return None
    g = tile.astype(np.float32)
    box = np.ones((3, 3), np.uint8)
    hi, lo = cv2.dilate(tile, box), cv2.erode(tile, box)
    live = ((hi != lo) & (hi < 255) & (lo > 0))[1:-1, 1:-1]
    if live.mean() < 0.05:
        return None
    resp = np.abs(cv2.filter2D(g, -1, _LAPLACE_DIFF, borderType=cv2.BORDER_REFLECT))[1:-1, 1:-1][live]
    edges = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))[1:-1, 1:-1][live]
    flat = edges <= np.percentile(edges, 90)
    return float(np.sqrt(np.pi / 2.0) * resp[flat].mean(dtype=np.float64) / 6.0)


_LAPLACE_DIFF = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_MIN_TILE = 32  # px: smaller images are one tile


def _noise_tiles(grey: np.ndarray) -> list[np.ndarray]:
    h, w = grey.shape
    n = _NOISE_TILES
    if h * w <= _SAMPLE_PIXELS:
        if min(h, w) < n * _MIN_TILE:
            return [grey]
        ys, xs = np.linspace(0, h, n + 1).round().astype(int), np.linspace(0, w, n + 1).round().astype(int)
        return [grey[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] for i in range(n) for j in range(n)]
    th = max(3, min(h // n, int(np.sqrt(_SAMPLE_PIXELS / (n * n) * h / w))))
    tw = max(3, min(w // n, int(_SAMPLE_PIXELS / (n * n) / th)))
    ys = np.linspace(0, h - th, n).round().astype(int)
    xs = np.linspace(0, w - tw, n).round().astype(int)
    return [grey[y : y + th, x : x + tw] for y in ys for x in xs]


def pixel_sample(image: np.ndarray, max_pixels: int = _SAMPLE_PIXELS) -> np.ndarray:
    """A strided grid of at most ~max_pixels pixels (the image itself when it is small)."""
    step = int(np.ceil(np.sqrt(image.shape[0] * image.shape[1] / max_pixels)))
    return image if step <= 1 else image[::step, ::step]


def colorfulness(image: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness metric (0 = grey, ~100+ = very colourful)."""
    rgb = pixel_sample(image).reshape(-1, 3).astype(np.float32)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(dtype=np.float64), yb.std(dtype=np.float64)) + 0.3 * np.hypot(rg.mean(dtype=np.float64), yb.mean(dtype=np.float64)))


def phash(grey: np.ndarray) -> str:
    """64-bit DCT perceptual hash, as 16 hex digits: the 8x8 lowest frequencies of a 32x32 DCT,
    thresholded at their median taken without the first row (which holds the DC term)."""
    small = cv2.resize(grey.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8]
    bits = (low > np.median(low[1:])).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def phash_distance(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def fidelity(image: np.ndarray, source: np.ndarray, mask: np.ndarray | None, affine: np.ndarray) -> dict[str, float]:
    """How faithfully the product's own pixels survive: warp the source into the output frame
    and compare inside the (slightly eroded) product mask, where the output should still be
    the product. Mean CIEDE2000 ~< 1 is invisible; ~> 5 is an obvious colour change."""
    h, w = image.shape[:2]
    if source.shape[:2] == (h, w) and np.array_equal(affine, identity_affine()):
        # Colour and restoration recipes move nothing: the warp would copy every pixel.
        warped, inside = source, np.ones((h, w), bool)
    else:
        warped = cv2.warpAffine(source, affine, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        inside = cv2.warpAffine(np.full(source.shape[:2], 255, np.uint8), affine, (w, h), flags=cv2.INTER_NEAREST) > 0
    region = inside if not has_mask(mask) else inside & (mask >= 128)
    # Resampling blurs the last pixel or two at the product's edge; that is not a fidelity loss.
    region = cv2.erode(region.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if region.sum() < 64:
        return {"score_fidelity_ssim": float("nan"), "score_fidelity_ciede2000": float("nan")}
    # Both metrics at ~0.25 MP: they are about colour and structure, not resolution, and
    # CIEDE2000 costs ~1 s per megapixel. Area-averaging keeps the comparison fair.
    scale = min(1.0, np.sqrt(250_000 / (h * w)))
    if scale < 1:
        size = (max(8, round(w * scale)), max(8, round(h * scale)))
        image, warped = (cv2.resize(x, size, interpolation=cv2.INTER_AREA) for x in (image, warped))
        region = cv2.resize(region.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    a, b, r = image, warped, region
    return {"score_fidelity_ssim": ssim(a, b, r), "score_fidelity_ciede2000": mean_ciede2000(a, b, r)}
