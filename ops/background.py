"""Background removal: the product mask (255 = product, soft at the edge) that compose,
fit_channel, the paste-back of generative ops and the fidelity scores all stand on.

`method: model` (the default) runs a learned salient-object model (ops/salient_models.py; the
embedded U²-Netp unless the recipe names its own ONNX file) over several passes per photo and
turns the averaged map into a soft matte plus `score_mask_confidence` (ops/matte.py), so a gate
can send a doubtful cutout to rejected/. `method: grabcut` is the classical, weight-free mask:
GrabCut seeded from the frame's border and a saliency map. The pixels are left as they are.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from ops.base import Batch, Item, Op, OpConfig, OpInputError, batch_of, has_mask, items_of
from ops.matte import Matte, drop_islands, fuse, mask_confidence, to_matte
from ops.models import ModelError, ModelInfo
from ops.registry import register
from ops.salient_models import Pass, SalientModel, escalated_pass_maps, infer_model_type

MASK_CONFIDENCE = "score_mask_confidence"


class RemoveBackgroundConfig(OpConfig):
    method: Literal["model", "grabcut"] = Field("model", description="learned salient-object model, or classical GrabCut")
    model: str = Field("builtin:u2netp", description="ONNX salient-object model: builtin:u2netp, a local path or s3:// (method: model)")
    model_type: str | None = Field(None, description="model family (u2net, u2netp, isnet-general-use, birefnet-general, ...) when the file name does not say it")
    scales: tuple[float, ...] = Field((0.8, 1.0, 1.2), min_length=1, max_length=6, description="input sizes as multiples of the model's own, averaged")
    flip: bool = Field(True, description="also look at the mirrored photo and average")
    min_island: float = Field(0.1, ge=0, lt=1, description="drop mask pieces with less probability mass than this share of the largest piece")
    threshold: float = Field(0.45, gt=0, lt=1, description="averaged probability where the matte is 50% (the hard mask's edge)")
    ramp: float = Field(0.4, gt=0, le=1, description="width of the matte's soft band in probability units (smaller = harder edge)")
    escalate_below: float | None = Field(
        0.95, ge=0, le=1,
        description="look once (one pass at the model's own size) and run the other passes only for photos whose one-pass confidence is under this; null = always every pass",
    )
    batch_size: int = Field(8, ge=1, le=256, description="passes per model call")
    use_source_alpha: bool = Field(True, description="a transparent source already has its mask: keep it")
    refine_radius: int = Field(2, ge=0, le=32, description="guided-filter radius for edges that follow the photo, in model pixels (0 = none)")
    # method: grabcut only
    work_side: int = Field(512, ge=128, le=2048, description="grabcut: runs at this longer side, then the mask is upsampled")
    iterations: int = Field(5, ge=1, le=20, description="grabcut: iterations")
    border: float = Field(0.02, gt=0, lt=0.2, description="grabcut: width of the border band taken as background, fraction of the side")
    min_area: float = Field(0.002, ge=0, lt=1, description="grabcut: drop mask islands smaller than this fraction of the frame")

    @model_validator(mode="after")
    def _check(self):
        if any(not 0.25 <= s <= 4 for s in self.scales):
            raise ValueError(f"scales must each be within 0.25..4, got {list(self.scales)}")
        if self.method == "model":
            try:
                infer_model_type(self.model, self.model_type)
            except ModelError as exc:
                raise ValueError(str(exc)) from None
        return self


@register
class RemoveBackground(Op):
    name = "remove_background"
    version = "4"  # 4: the matte's guided filter fitted at a subsampled size (fast guided filter)
    Config = RemoveBackgroundConfig
    model_fields = ("model",)

    def model_refs(self) -> dict[str, str]:
        return super().model_refs() if self.config.method == "model" else {}

    def check_model(self, field: str, info: ModelInfo) -> None:
        if info.kind != "checkpoint" or info.suffix != ".onnx":
            raise ModelError(f"model {info.ref!r} is a {info.kind}{' ' + info.suffix if info.suffix else ''}; remove_background needs one .onnx salient-object model (rembg family)")

    def setup(self) -> None:
        if self.config.method == "model":
            c = self.config
            self._model = SalientModel(
                self.models["model"].path,
                infer_model_type(c.model, c.model_type),
                device="cuda" if self.resources.uses_gpu else "cpu",
                max_batch=c.batch_size,
            )
            self._passes = [Pass(size, flip) for size in self._model.sizes_for(c.scales) for flip in ((False, True) if c.flip else (False,))]

    def check_item(self, item: Item) -> None:
        h, w = item.image.shape[:2]
        if min(h, w) < 16:
            raise OpInputError(f"image is {w}x{h}; background removal needs at least 16 px per side")

    def __call__(self, batch: Batch) -> Batch:
        return batch_of(self.apply_items(items_of(batch)), batch)

    def apply(self, item: Item) -> Item:
        return self.apply_items([item])[0]

    def apply_items(self, items: list[Item]) -> list[Item]:
        """Segment many rows at once: the model sees all their passes in batched calls."""
        self.ensure_setup()
        items = list(items)
        todo = [k for k, it in enumerate(items) if not (self.config.use_source_alpha and has_mask(it.mask))]
        for k in set(range(len(items))) - set(todo):
            # Only decode (a transparent source) puts a mask on a row before this op runs.
            items[k] = items[k].with_scores({MASK_CONFIDENCE: 1.0})
        if self.config.method == "grabcut":
            for k in todo:
                items[k] = items[k].with_mask(grabcut_mask(items[k].image, self.config))
        elif todo:
            for k, matte in zip(todo, self._mattes([items[k].image for k in todo])):
                items[k] = items[k].with_mask(matte.alpha).with_scores({MASK_CONFIDENCE: matte.confidence})
        return items

    def _pass_maps(self, images: list[np.ndarray]) -> list[list[np.ndarray]]:
        """Each image's probability maps. With `escalate_below`, every photo first gets one
        look at the model's own size; only those the model is unsure about get the other
        passes (sizes, mirror), which cost ~5x the first. Most catalog photos are clear
        cases: on the real photos of ../shared/segmentation, escalating below 0.95 kept the
        full ensemble's IoU and gate rates at ~60% of its cost; below 0.9 it cost a third but
        the gate caught fewer bad cutouts (docs/benchmarks.md)."""
        return escalated_pass_maps(self._model, images, self._passes, self.config.escalate_below).maps

    def _mattes(self, images: list[np.ndarray]) -> list[Matte]:
        """A matte per image from its passes' maps, in batched model calls."""
        c = self.config
        out = []
        for image, maps in zip(images, self._pass_maps(images)):
            prob = fuse(maps)
            # Confidence reads the probability map itself (P > 0.5), not where the matte's edge sits.
            confidence = mask_confidence(prob)
            alpha = to_matte(drop_islands(prob, c.min_island, c.threshold), image, refine_radius=c.refine_radius, ramp=c.ramp, threshold=c.threshold)
            if not (alpha > 127).any():
                raise OpInputError("no product found: the segmentation model sees no foreground object in this photo")
            out.append(Matte(alpha=alpha, confidence=confidence))
        return out


def grabcut_mask(image: np.ndarray, c: RemoveBackgroundConfig) -> np.ndarray:
    """The classical mask (`method: grabcut`): GrabCut seeded from the frame's border and a
    saliency map, edges refined with a guided filter."""
    h, w = image.shape[:2]
    if min(h, w) < 16:
        raise OpInputError(f"image is {w}x{h}; background removal needs at least 16 px per side")

    # 1. Work small: GrabCut is O(pixels x iterations).
    scale = min(1.0, c.work_side / max(h, w))
    small = cv2.resize(image, (max(16, round(w * scale)), max(16, round(h * scale))), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]

    # 2. Seeds. The border band is background where it looks like the border's colour model;
    #    saliency (Lab distance from the border colours) marks probable foreground.
    saliency = _border_contrast(small)
    band = max(2, round(c.border * max(sh, sw)))
    border = np.zeros((sh, sw), bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    thresh = max(_otsu(saliency), 0.05)
    gc = np.full((sh, sw), cv2.GC_PR_BGD, np.uint8)
    # Catalog photos centre the product: sure-foreground seeds only near the centre, so
    # colourful clutter at the edges can at most be probable foreground.
    centre = _centre_prior(sh, sw)
    gc[saliency >= thresh] = cv2.GC_PR_FGD
    gc[(saliency >= min(1.0, 2.0 * thresh)) & (centre < 0.6)] = cv2.GC_FGD
    gc[border & (saliency < thresh)] = cv2.GC_BGD
    if not (gc == cv2.GC_PR_FGD).any() and not (gc == cv2.GC_FGD).any():
        raise OpInputError("no product found: the image looks like plain background")

    # 3. GrabCut from the seeds.
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(small, gc, None, bgd, fgd, c.iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        pass  # a degenerate colour model (e.g. a two-colour image): keep the seed mask
    hard = np.isin(gc, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)

    # 4. Clean up: drop islands, fill holes (labels, handles and glare are part of the product).
    hard = _drop_small_components(hard, c.min_area)
    hard = _fill_enclosed_holes(hard, small)
    if hard.sum() == 0:
        raise OpInputError("no product found: background removal left an empty mask")

    # 5. Back to full size with soft edges that follow the image.
    mask = cv2.resize(hard * 255, (w, h), interpolation=cv2.INTER_LINEAR)
    if c.refine_radius:
        guide = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        radius = max(1, round(c.refine_radius / max(scale, 1e-6) * 0.5))
        mask = cv2.ximgproc.guidedFilter(guide, mask, radius, (0.02 * 255) ** 2)
    return mask


def _border_contrast(img: np.ndarray) -> np.ndarray:
    """0..1 map of how unlike the frame's border each pixel is (distance in Lab to the
    nearest of a few border colour clusters, so gradients and two-tone backdrops work)."""
    lab = cv2.cvtColor(cv2.GaussianBlur(img, (0, 0), 1.0), cv2.COLOR_RGB2LAB).astype(np.float32)
    h, w = lab.shape[:2]
    b = max(2, round(0.02 * max(h, w)))
    ring = np.concatenate([lab[:b].reshape(-1, 3), lab[-b:].reshape(-1, 3), lab[:, :b].reshape(-1, 3), lab[:, -b:].reshape(-1, 3)])
    k = min(4, len(ring))
    cv2.setRNGSeed(0)  # kmeans++ draws from OpenCV's global RNG: same image, same mask
    _, assign, centres = cv2.kmeans(
        ring, k, None, (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 0.5), 2, cv2.KMEANS_PP_CENTERS
    )
    # A product that touches the frame puts its own colours in the ring; they form small
    # clusters. Only clusters holding >= 10% of the ring describe the backdrop.
    share = np.bincount(assign.ravel(), minlength=k) / len(assign)
    keep = share >= 0.10
    centres, ring = centres[keep], ring[keep[assign.ravel()]]
    dist = _shadow_tolerant_distance(lab.reshape(-1, 3), centres).reshape(h, w)
    # The spread of the border itself sets the scale: textured backdrops need a larger distance.
    ring_spread = float(np.percentile(_shadow_tolerant_distance(ring, centres), 95))
    return np.clip(dist / max(40.0, 3.0 * ring_spread), 0.0, 1.0)


def _shadow_tolerant_distance(lab: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Lab distance to the nearest centre, where being up to ~25 L units *darker* with the same
    chroma counts for nothing: that is what a cast shadow on the backdrop looks like. Darker
    than that counts in full, so a black product on white is still product (OpenCV's 8-bit
    Lab scales L to 0..255, hence 25 * 2.55)."""
    d = lab[:, None, :] - centres[None, :, :]
    allowance = 25 * 2.55
    d_l = np.where(d[..., 0] < 0, np.minimum(0.0, d[..., 0] + allowance), d[..., 0])
    return np.min(np.sqrt(d_l**2 + d[..., 1] ** 2 + d[..., 2] ** 2), axis=1)


def _centre_prior(h: int, w: int) -> np.ndarray:
    """Normalised elliptical distance from the frame's centre (0 at centre, 1 at the edges)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sqrt(((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2)


def _otsu(values: np.ndarray) -> float:
    v8 = np.clip(values * 255, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(v8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t) / 255.0


def _drop_small_components(mask: np.ndarray, min_frac: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep_min = max(min_frac * mask.size, 0.05 * areas.max())
    keep = np.zeros(n, bool)
    keep[1:] = areas >= keep_min
    return keep[labels].astype(np.uint8)


def _fill_enclosed_holes(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Fill holes that are product (a label or glare GrabCut took for backdrop) but keep the
    openings of mug and bag handles, which show the backdrop.

    A hole is filled when it is ringed by thick product (erode the mask by a few percent of
    the product's size: a handle ring breaks and its opening joins the outside, a label in a
    solid body stays enclosed), or when its colour differs from the backdrop just outside the
    product (a label near an edge)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask == 0).astype(np.uint8), connectivity=4)
    if n <= 2:
        return mask
    h, w = mask.shape
    r = max(2, int(0.05 * np.sqrt(mask.sum())))
    eroded = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    m, outside_labels = cv2.connectedComponents((eroded == 0).astype(np.uint8), connectivity=4)
    border_ids = set(np.unique(np.concatenate([outside_labels[0], outside_labels[-1], outside_labels[:, 0], outside_labels[:, -1]])))
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32)
    ring = (cv2.dilate(mask, np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0) & (mask == 0)
    backdrop = lab[ring].mean(axis=0) if ring.any() else None
    out = mask.copy()
    for i in range(1, n):
        x, y, bw, bh, _ = stats[i]
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            continue  # the outside itself
        hole = labels == i
        enclosed = not set(np.unique(outside_labels[hole])) & border_ids
        unlike_backdrop = backdrop is not None and float(np.linalg.norm(lab[hole].mean(axis=0) - backdrop)) > 22.0
        if enclosed or unlike_backdrop:
            out[hole] = 1
    return out
