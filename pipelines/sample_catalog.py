"""A synthetic catalog with ground truth: procedurally rendered product photos.

Each product (bottle, box, shoe, bag, mug, can) is drawn with shading, a printed label and a
contact shadow, on a plain, gradient, textured or cluttered backdrop; then one known
degradation is applied (colour cast, noise, low light, blur, watermark text, or none). Beside
each photo the clean render, the product mask and (for watermarks) the overlay mask are
written, so tests and benchmarks can measure ops against the truth.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np

from ops.color import linear_to_srgb, srgb_to_linear
from ops.overlay import StampWatermarkConfig, stamp_text

PRODUCTS = ("bottle", "box", "shoe", "bag", "mug", "can")
BACKGROUNDS = ("plain", "gradient", "textured", "cluttered")
DEGRADATIONS = ("none", "color_cast", "noise", "low_light", "blur", "watermark")
_BRANDS = ("NORDA", "Ferro", "LUMA", "Kettle&Co", "ARBOR", "Sable", "Pico", "Vanta")


@dataclasses.dataclass
class Rendered:
    sku: str
    product: str
    background: str
    degradation: str
    title: str
    clean: np.ndarray  # HxWx3 uint8: the photo before degradation
    photo: np.ndarray  # HxWx3 uint8: what the catalog holds
    mask: np.ndarray  # HxW uint8 product mask, 255 = product
    overlay: np.ndarray  # HxW uint8 overlay mask (watermark pixels), zeros when none
    params: dict


def render_product(
    seed: int,
    *,
    product: str | None = None,
    background: str | None = None,
    degradation: str | None = None,
    size: tuple[int, int] | None = None,
) -> Rendered:
    rng = np.random.default_rng(seed)
    product = product or PRODUCTS[seed % len(PRODUCTS)]
    # Cycle backgrounds and degradations at other strides than products, so every product
    # meets every backdrop and degradation within a few dozen seeds.
    background = background or BACKGROUNDS[(seed + seed // len(PRODUCTS)) % len(BACKGROUNDS)]
    degradation = degradation or DEGRADATIONS[(seed + 2 * (seed // len(PRODUCTS))) % len(DEGRADATIONS)]
    if product not in PRODUCTS or background not in BACKGROUNDS or degradation not in DEGRADATIONS:
        raise ValueError(f"unknown product/background/degradation: {product!r}, {background!r}, {degradation!r}")
    w, h = size or (int(rng.integers(880, 1100)), int(rng.integers(880, 1100)))

    # 1. Backdrop.
    bg = _backdrop(rng, background, w, h)
    # 2. Product shape + shading, placed around the centre.
    colour = np.array(_hsv_colour(rng), np.float32)
    layer, mask = _draw_product(rng, product, colour, w, h)
    brand = str(rng.choice(_BRANDS))
    title = f"{brand} {product}"
    _print_label(rng, layer, mask, product, brand)
    # 3. Contact shadow on the backdrop, then the product over it.
    shadow = _shadow(mask)
    clean = bg * (1 - 0.45 * shadow[..., None])
    m = (mask > 0)[..., None]
    clean = np.where(m, layer, clean)
    clean = np.clip(clean + 0.5, 0, 255).astype(np.uint8)
    # 4. The known degradation.
    photo, overlay, params = _degrade(rng, clean, degradation)
    return Rendered(
        sku=f"SKU-{seed:05d}",
        product=product,
        background=background,
        degradation=degradation,
        title=title,
        clean=clean,
        photo=photo,
        mask=mask,
        overlay=overlay,
        params=params,
    )


def write_sample_catalog(out_dir: str | Path, count: int, *, seed: int = 0) -> Path:
    """Write `count` products, `manifest.jsonl` and `truth/`; returns the manifest path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    with (out / "manifest.jsonl").open("w") as manifest, (out / "truth" / "truth.jsonl").open("w") as truth:
        for i in range(count):
            r = render_product(seed * 100_000 + i)
            img_path = out / "images" / f"{r.sku}.jpg"
            cv2.imwrite(str(img_path), cv2.cvtColor(r.photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
            cv2.imwrite(str(out / "truth" / f"{r.sku}.clean.png"), cv2.cvtColor(r.clean, cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(out / "truth" / f"{r.sku}.mask.png"), r.mask)
            if r.overlay.any():
                cv2.imwrite(str(out / "truth" / f"{r.sku}.overlay.png"), r.overlay)
            row = {
                "sku": r.sku,
                "image_uri": str(img_path.resolve()),
                "title": r.title,
                "category": r.product,
                "attributes": {"background": r.background},
            }
            manifest.write(json.dumps(row) + "\n")
            truth.write(
                json.dumps({"sku": r.sku, "product": r.product, "background": r.background, "degradation": r.degradation, **r.params})
                + "\n"
            )
    return out / "manifest.jsonl"


# ----------------------------------------------------------------------------- backdrops


def _backdrop(rng, kind: str, w: int, h: int) -> np.ndarray:
    # Studio backdrops are near-neutral; white balance is measured on them.
    base = np.array(_hsv_colour(rng, sat=(0.0, 0.08), val=(0.55, 0.97)), np.float32)
    bg = np.empty((h, w, 3), np.float32)
    bg[:] = base
    if kind == "gradient":
        other = np.array(_hsv_colour(rng, sat=(0.0, 0.12), val=(0.4, 0.95)), np.float32)
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        bg = bg * (1 - t) + other * t
    elif kind == "textured":
        noise = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
        noise = cv2.resize(cv2.GaussianBlur(noise, (0, 0), 1.5), (w, h), interpolation=cv2.INTER_CUBIC)
        grain = rng.normal(0, 4, (h, w)).astype(np.float32)
        bg = bg + (18 * noise + grain)[..., None]
    elif kind == "cluttered":
        for _ in range(int(rng.integers(12, 22))):
            c = tuple(float(v) for v in _hsv_colour(rng, sat=(0.2, 0.8), val=(0.3, 0.9)))
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(w // 20, w // 7))
            if rng.random() < 0.5:
                cv2.circle(bg, (x, y), r, c, -1, cv2.LINE_AA)
            else:
                cv2.rectangle(bg, (x - r, y - r // 2), (x + r, y + r // 2), c, -1, cv2.LINE_AA)
        bg = cv2.GaussianBlur(bg, (0, 0), 2.5)  # shallow depth of field
    return np.clip(bg, 0, 255)


def _hsv_colour(rng, sat=(0.35, 0.9), val=(0.3, 0.85)) -> tuple[float, float, float]:
    hsv = np.uint8([[[rng.integers(0, 180), int(255 * rng.uniform(*sat)), int(255 * rng.uniform(*val))]]])
    return tuple(float(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])


# ----------------------------------------------------------------------------- products


def _draw_product(rng, kind: str, colour: np.ndarray, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((h, w), np.uint8)
    cx = int(w * rng.uniform(0.42, 0.58))
    base_y = int(h * rng.uniform(0.78, 0.86))
    size = int(min(w, h) * rng.uniform(0.5, 0.62))
    if kind == "bottle":
        bw = int(size * 0.36)
        top = base_y - size
        cv2.rectangle(mask, (cx - bw // 2, top + int(size * 0.3)), (cx + bw // 2, base_y), 255, -1)
        cv2.ellipse(mask, (cx, top + int(size * 0.3)), (bw // 2, int(size * 0.12)), 0, 180, 360, 255, -1)
        cv2.rectangle(mask, (cx - bw // 6, top), (cx + bw // 6, top + int(size * 0.22)), 255, -1)
        shade = _cylinder_shading(w, h, cx, bw)
    elif kind in ("can", "mug"):
        bw = int(size * (0.5 if kind == "can" else 0.6))
        top = base_y - int(size * (0.85 if kind == "can" else 0.62))
        cv2.rectangle(mask, (cx - bw // 2, top), (cx + bw // 2, base_y), 255, -1)
        cv2.ellipse(mask, (cx, base_y), (bw // 2, bw // 10), 0, 0, 180, 255, -1)
        cv2.ellipse(mask, (cx, top), (bw // 2, bw // 10), 0, 0, 360, 255, -1)
        if kind == "mug":
            cv2.ellipse(mask, (cx + bw // 2, (top + base_y) // 2), (bw // 4, (base_y - top) // 3), 0, -90, 90, 255, max(8, bw // 12))
        shade = _cylinder_shading(w, h, cx, bw)
    elif kind == "box":
        bw, bh, depth = int(size * 0.62), int(size * 0.8), int(size * 0.16)
        x0, y0 = cx - bw // 2, base_y - bh
        front = np.array([[x0, y0], [x0 + bw, y0], [x0 + bw, base_y], [x0, base_y]])
        side = np.array([[x0 + bw, y0], [x0 + bw + depth, y0 - depth], [x0 + bw + depth, base_y - depth], [x0 + bw, base_y]])
        lid = np.array([[x0, y0], [x0 + depth, y0 - depth], [x0 + bw + depth, y0 - depth], [x0 + bw, y0]])
        shade = np.ones((h, w), np.float32)
        for poly, light in ((front, 1.0), (side, 0.7), (lid, 1.18)):
            cv2.fillPoly(mask, [poly.astype(np.int32)], 255)
            face = np.zeros((h, w), np.uint8)
            cv2.fillPoly(face, [poly.astype(np.int32)], 1)
            shade[face > 0] = light
    elif kind == "shoe":
        bw = int(size * 1.1)
        x0 = cx - bw // 2
        pts = np.array(
            [[x0, base_y], [x0 + bw, base_y], [x0 + bw, base_y - int(size * 0.12)], [x0 + int(bw * 0.72), base_y - int(size * 0.3)],
             [x0 + int(bw * 0.45), base_y - int(size * 0.42)], [x0 + int(bw * 0.08), base_y - int(size * 0.5)], [x0, base_y - int(size * 0.3)]]
        )
        cv2.fillPoly(mask, [pts.astype(np.int32)], 255, cv2.LINE_8)
        shade = _vertical_shading(w, h, base_y - int(size * 0.5), base_y)
        sole = np.zeros((h, w), np.uint8)
        cv2.rectangle(sole, (x0, base_y - int(size * 0.06)), (x0 + bw, base_y), 1, -1)
        shade[(sole > 0) & (mask > 0)] = 1.6
    else:  # bag
        bw, bh = int(size * 0.8), int(size * 0.62)
        x0 = cx - bw // 2
        pts = np.array([[x0, base_y], [x0 + bw, base_y], [x0 + int(bw * 0.88), base_y - bh], [x0 + int(bw * 0.12), base_y - bh]])
        cv2.fillPoly(mask, [pts.astype(np.int32)], 255)
        cv2.ellipse(mask, (cx, base_y - bh), (int(bw * 0.28), int(size * 0.28)), 0, 180, 360, 255, max(8, bw // 16))
        shade = _vertical_shading(w, h, base_y - bh, base_y)
    layer = np.clip(colour[None, None, :] * shade[..., None], 0, 255)
    return layer.astype(np.float32), mask


def _cylinder_shading(w, h, cx, bw) -> np.ndarray:
    x = (np.arange(w, dtype=np.float32) - cx) / max(1, bw / 2)
    s = 0.55 + 0.6 * np.sqrt(np.clip(1 - x**2, 0, 1)) + 0.25 * np.exp(-((x + 0.35) ** 2) / 0.01)
    return np.tile(s, (h, 1))


def _vertical_shading(w, h, top, bottom) -> np.ndarray:
    y = (np.arange(h, dtype=np.float32) - top) / max(1, bottom - top)
    return np.tile((1.15 - 0.4 * np.clip(y, 0, 1))[:, None], (1, w))


def _print_label(rng, layer: np.ndarray, mask: np.ndarray, kind: str, brand: str) -> None:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    bw, bh = x1 - x0, y1 - y0
    lx0, lx1 = x0 + int(bw * 0.15), x1 - int(bw * 0.15)
    ly0, ly1 = y0 + int(bh * 0.45), y0 + int(bh * 0.7)
    if kind in ("shoe", "bag"):
        ly0, ly1 = y0 + int(bh * 0.55), y0 + int(bh * 0.75)
    if kind == "mug":  # the bounding box includes the handle; print on the body only
        lx1 = x0 + int(bw * 0.62)
    paper = np.array(_hsv_colour(rng, sat=(0.0, 0.2), val=(0.85, 1.0)), np.float32)
    label = np.zeros(mask.shape, np.uint8)
    cv2.rectangle(label, (lx0, ly0), (lx1, ly1), 1, -1)
    label &= mask > 0
    layer[label > 0] = layer[label > 0] * 0.15 + paper * 0.85
    ink = tuple(float(v) for v in _hsv_colour(rng, sat=(0.5, 1.0), val=(0.1, 0.5)))
    fs = max(0.3, (ly1 - ly0) / 60.0)
    (tw, th), _ = cv2.getTextSize(brand, cv2.FONT_HERSHEY_DUPLEX, fs, 2)
    fs *= min(1.0, 0.9 * (lx1 - lx0) / max(tw, 1))
    (tw, th), _ = cv2.getTextSize(brand, cv2.FONT_HERSHEY_DUPLEX, fs, 2)
    org = ((lx0 + lx1 - tw) // 2, (ly0 + ly1 + th) // 2)
    # Text coverage drawn on 8 bits, then blended: OpenCV 5 draws text on 8-bit images only.
    text = np.zeros(mask.shape, np.uint8)
    cv2.putText(text, brand, org, cv2.FONT_HERSHEY_DUPLEX, fs, 255, max(1, round(fs * 1.5)), cv2.LINE_AA)
    a = (text.astype(np.float32) / 255.0)[..., None]
    layer[:] = layer * (1.0 - a) + np.asarray(ink, np.float32) * a


def _shadow(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    shadow = np.zeros(mask.shape, np.float32)
    bw = xs.max() - xs.min()
    cv2.ellipse(shadow, (int(xs.mean()), int(ys.max())), (int(bw * 0.55), max(2, int(bw * 0.06))), 0, 0, 360, 1.0, -1)
    return cv2.GaussianBlur(shadow, (0, 0), max(2.0, bw * 0.04))


# ----------------------------------------------------------------------------- degradations


def _degrade(rng, clean: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, dict]:
    overlay = np.zeros(clean.shape[:2], np.uint8)
    if kind == "color_cast":
        gains = np.array([rng.uniform(1.1, 1.3), 1.0, rng.uniform(0.7, 0.85)], np.float64)
        if rng.random() < 0.5:
            gains = gains[::-1]
        return linear_to_srgb(srgb_to_linear(clean) * gains / gains.max() * 1.05), overlay, {"gains": gains.round(3).tolist()}
    if kind == "noise":
        sigma = float(rng.uniform(8, 14))
        noisy = clean.astype(np.float32) + rng.normal(0, sigma, clean.shape)
        return np.clip(noisy + 0.5, 0, 255).astype(np.uint8), overlay, {"sigma": round(sigma, 2)}
    if kind == "low_light":
        factor = float(rng.uniform(0.25, 0.4))
        return linear_to_srgb(srgb_to_linear(clean) * factor), overlay, {"exposure": round(factor, 3)}
    if kind == "blur":
        sigma = float(rng.uniform(1.5, 2.5))
        return cv2.GaussianBlur(clean, (0, 0), sigma), overlay, {"blur_sigma": round(sigma, 2)}
    if kind == "watermark":
        cfg = StampWatermarkConfig(text=str(rng.choice(["SAMPLE", "PREVIEW", "(c) STOCK"])), opacity=0.6, position="tile", scale=0.045)
        marked = stamp_text(clean, cfg)
        overlay = (np.abs(marked.astype(np.int16) - clean.astype(np.int16)).max(axis=2) > 3).astype(np.uint8) * 255
        return marked, overlay, {"watermark": cfg.text}
    return clean.copy(), overlay, {}
