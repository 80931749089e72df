"""Small packshots still give a main image: the smallest canvas a channel accepts, optional
super-resolution, and a refusal (naming the numbers) only when even that would blur."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ops.base import Item, OpInputError, identity_affine
from ops.codec import encode_image
from ops.compliance import Subject, evaluate
from ops.compose import Compose
from ops.fit_channel import FitChannel
from ops.metrics import psnr
from ops.scores import fidelity
from pipelines.recipes import load_recipe
from pipelines.sample_catalog import render_product
from tests.conftest import SHARED

MAIN = {"size": 1600, "min_size": 1000, "fill": 0.87}  # marketplace-main's compose


def _packshot(seed: int, side: int, render: int = 1200) -> Item:
    """A packshot as shops have them: the product on white, filling most of a `side` px frame."""
    r = render_product(seed, background="plain", degradation="none", size=(render, render))
    on_white = np.where(r.mask[..., None] > 0, r.clean, 255).astype(np.uint8)
    ys, xs = np.nonzero(r.mask)
    cx, cy, half = (xs.min() + xs.max()) // 2, (ys.min() + ys.max()) // 2, int(0.55 * max(np.ptp(xs), np.ptp(ys)))
    y0, x0 = max(0, cy - half), max(0, cx - half)
    crop, mask = on_white[y0 : cy + half, x0 : cx + half], r.mask[y0 : cy + half, x0 : cx + half]
    return Item(cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA), cv2.resize(mask, (side, side), interpolation=cv2.INTER_LINEAR),
                identity_affine(), 0, {})  # fmt: skip


def _amazon(item: Item) -> dict:
    data = encode_image(item.image, "JPEG", 92)
    return evaluate(Subject(image=item.image, mask=item.mask, fmt="JPEG", n_bytes=len(data)))


def test_marketplace_main_composes_small_packshots_on_the_smallest_accepted_canvas():
    compose = next(s.op for s in load_recipe("marketplace-main").steps if s.op.name == "compose")
    assert compose.config.min_size == 1000
    for seed, side in ((1, 250), (3, 300), (5, 340)):
        item = _packshot(seed, side)
        out = compose.apply(item)
        h, w = out.image.shape[:2]
        assert 1000 <= w == h < 1600, (side, w)
        # Enlargement stays within max_upscale; the product is where the affine says.
        assert out.affine[0, 0] <= compose.config.max_upscale + 1e-9
        assert fidelity(out.image, item.image, out.mask, out.affine)["score_fidelity_ciede2000"] < 3
        checked = _amazon(out)
        assert checked["compliance_amazon_main"], checked["compliance_notes"]
    # A large source still gets the preferred 1600 px.
    assert compose.apply(_packshot(1, 900)).image.shape[:2] == (1600, 1600)


def test_refusals_name_the_enlargement_and_the_smallest_canvas():
    small = _packshot(2, 320)
    with pytest.raises(OpInputError, match=r"over max_upscale=4.0; use a larger source, set min_size"):
        Compose({"size": 1600, "fill": 0.87}).apply(small)
    tiny = _packshot(2, 200)
    with pytest.raises(OpInputError, match=r"already the smallest canvas, min_size=1000"):
        Compose(MAIN).apply(tiny)
    with pytest.raises(Exception, match="min_size=2000 is larger than size=1600"):
        Compose({"size": 1600, "min_size": 2000})


def test_fit_channel_uses_the_channels_minimum_for_a_small_packshot():
    fixed = FitChannel({"channel": "amazon_main", "max_upscale": 4.0}).apply(_packshot(3, 320))
    assert 1000 <= fixed.image.shape[0] < 1600
    checked = _amazon(fixed)
    assert checked["compliance_amazon_main"], checked["compliance_notes"]


def test_super_resolution_model_enlarges_the_product_before_it_is_placed():
    weights = SHARED / "weights" / "FSRCNN_Tensorflow__FSRCNN_x2.pb"
    if not weights.is_file():
        pytest.skip("../shared/weights is not present on this machine")
    truth = _packshot(4, 1200, render=2400)
    small = Item(cv2.resize(truth.image, (300, 300), interpolation=cv2.INTER_AREA), cv2.resize(truth.mask, (300, 300), interpolation=cv2.INTER_LINEAR),
                 identity_affine(), 0, {})  # fmt: skip
    plain = Compose(MAIN).apply(small)
    sr_op = Compose({**MAIN, "upscale_model": str(weights)})
    sr_op.ensure_setup()
    sr = sr_op.apply(small)
    assert sr.image.shape == plain.image.shape
    assert fidelity(sr.image, small.image, sr.mask, sr.affine)["score_fidelity_ciede2000"] < 3
    # Against the same product rendered at full size and placed on the same canvas.
    reference = Compose({**MAIN, "size": plain.image.shape[0], "min_size": None}).apply(truth)
    inside = reference.mask >= 128
    assert psnr(sr.image[inside], reference.image[inside]) >= psnr(plain.image[inside], reference.image[inside]) - 0.3
