"""Each op measured against the synthetic catalog's ground truth (clean renders and masks)."""

from __future__ import annotations

import numpy as np
import pytest

from ops.base import NO_MASK, Item, identity_affine
from ops.metrics import iou, mean_ciede2000, psnr
from ops.registry import op_class
from ops.scores import fidelity, noise_sigma, phash, phash_distance, quality_scores
from pipelines.sample_catalog import PRODUCTS, render_product


def run(op: str, cfg: dict, image: np.ndarray, mask=NO_MASK, context=None) -> Item:
    o = op_class(op)(cfg)
    o.ensure_setup()
    return o.apply(Item(image, mask, identity_affine(), 0, context or {}))


def test_denoise_raises_psnr_against_the_clean_render():
    gains = []
    for seed in range(3):
        r = render_product(seed, degradation="noise", size=(480, 480))
        before, after = psnr(r.photo, r.clean), psnr(run("denoise", {}, r.photo).image, r.clean)
        gains.append(after - before)
    assert min(gains) > 5.0, gains  # dB


def test_denoise_leaves_clean_images_alone():
    r = render_product(1, degradation="none", size=(400, 400))
    assert np.array_equal(run("denoise", {}, r.clean).image, r.clean)


def test_white_balance_reduces_the_cast_on_neutral_areas():
    before, after = [], []
    for seed in range(6):
        r = render_product(seed, degradation="color_cast", size=(480, 480))
        hsv_sat = r.clean.max(axis=2).astype(int) - r.clean.min(axis=2)
        neutral = (r.mask == 0) & (hsv_sat < 20)  # backdrop pixels that are grey in the truth
        out = run("white_balance", {"method": "gray_world"}, r.photo).image
        before.append(mean_ciede2000(r.photo, r.clean, neutral))
        after.append(mean_ciede2000(out, r.clean, neutral))
    assert np.mean(after) < 0.65 * np.mean(before), (before, after)


@pytest.mark.parametrize("background", ["plain", "gradient"])
def test_background_removal_iou_on_plain_backdrops(background):
    scores = []
    for seed in range(len(PRODUCTS) * 2):
        r = render_product(seed, background=background, degradation="none", size=(560, 560))
        mask = run("remove_background", {}, r.photo).mask
        scores.append(iou(mask >= 128, r.mask > 0))
    assert np.mean(scores) >= 0.95, np.round(scores, 3)
    assert np.median(scores) >= 0.98, np.round(scores, 3)


def test_background_removal_keeps_handle_openings():
    r = render_product(4, background="plain", degradation="none", size=(560, 560))  # a mug
    assert r.product == "mug"
    mask = run("remove_background", {}, r.photo).mask
    assert iou(mask >= 128, r.mask > 0) > 0.97


def test_overlay_removal_with_given_mask_cuts_error_by_70_percent():
    for seed in range(3):
        r = render_product(seed, degradation="watermark", size=(520, 520))
        region = r.overlay > 0
        err_before = np.abs(r.photo.astype(float) - r.clean)[region].mean()
        out = run("remove_overlay", {"mask": "given"}, r.photo, context={"overlay_mask": r.overlay}).image
        err_after = np.abs(out.astype(float) - r.clean)[region].mean()
        assert err_after <= 0.3 * err_before, (seed, err_before, err_after)


def test_overlay_detection_finds_watermark_strokes():
    # Weight-free detection is weaker than a given mask; measured, not assumed.
    recall = []
    for seed in range(3):
        r = render_product(seed, degradation="watermark", size=(520, 520))
        from ops.overlay import detect_overlay

        found = detect_overlay(r.photo) > 0
        recall.append((found & (r.overlay > 0)).sum() / (r.overlay > 0).sum())
    assert np.mean(recall) > 0.2, recall


def test_compose_white_border_and_requested_fill():
    r = render_product(2, background="plain", degradation="none", size=(600, 600))
    item = Item(r.photo, r.mask, identity_affine(), 0, {})
    out = op_class("compose")({"size": 800, "fill": 0.85})(
        {"image": [item.image], "mask": [item.mask], "affine": [item.affine], "seed": [0]}
    )
    img, mask = out["image"][0], out["mask"][0]
    assert img.shape == (800, 800, 3)
    border = np.concatenate([img[:5].reshape(-1, 3), img[-5:].reshape(-1, 3), img[:, :5].reshape(-1, 3), img[:, -5:].reshape(-1, 3)])
    assert (border == 255).all()
    ys, xs = np.nonzero(mask >= 128)
    fill = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 800
    assert abs(fill - 0.85) < 0.01, fill
    # The product's own pixels survive the move (fidelity through the recorded affine).
    f = fidelity(img, r.photo, mask, out["affine"][0])
    assert f["score_fidelity_ciede2000"] < 2.0 and f["score_fidelity_ssim"] > 0.8, f


def test_compose_without_mask_is_a_clear_input_error():
    from ops.base import OpInputError

    with pytest.raises(OpInputError, match="remove_background before compose"):
        run("compose", {}, np.zeros((64, 64, 3), np.uint8))


def test_geometry_ops_track_the_affine():
    r = render_product(0, degradation="none", size=(400, 300))
    item = Item(r.photo, r.mask, identity_affine(), 0, {})
    for op, cfg in (("resize", {"max_side": 640}), ("pad", {"aspect": "1:1"}), ("crop", {"to": "product", "margin": 0.1})):
        o = op_class(op)(cfg)
        item = o.apply(item)
    f = fidelity(item.image, r.photo, item.mask, item.affine)
    assert f["score_fidelity_ciede2000"] < 1.5, f


def test_scores_respond_to_the_degradations():
    clean = render_product(3, degradation="none", size=(480, 480))
    noisy = render_product(3, degradation="noise", size=(480, 480))
    blurry = render_product(3, degradation="blur", size=(480, 480))
    s_clean, s_noisy, s_blur = (quality_scores(r.photo) for r in (clean, noisy, blurry))
    assert abs(s_noisy["score_noise_sigma"] - noisy.params["sigma"]) < 0.35 * noisy.params["sigma"]
    assert s_clean["score_noise_sigma"] < 2.0
    assert s_blur["score_sharpness"] < 0.5 * s_clean["score_sharpness"]
    assert phash_distance(phash(clean.photo[..., 1]), phash(blurry.photo[..., 1])) <= 6
    assert noise_sigma(np.full((50, 50), 128, np.uint8)) == 0.0


def test_transparent_source_keeps_its_own_mask():
    import io

    from PIL import Image

    from ops.codec import decode_image

    r = render_product(5, background="cluttered", degradation="none", size=(400, 400))
    rgba = np.dstack([r.clean, r.mask])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    decoded = decode_image(buf.getvalue())
    out = run("remove_background", {}, decoded.image, mask=decoded.alpha).mask
    assert np.array_equal(out, decoded.alpha) and iou(out >= 128, r.mask > 0) == 1.0
    # Without the option the mask is recomputed from the pixels: a wrong alpha (a box) is ignored.
    box = np.zeros_like(decoded.alpha)
    box[10:100, 10:100] = 255
    recomputed = run("remove_background", {"use_source_alpha": False}, decoded.image, mask=box).mask
    assert iou(recomputed >= 128, r.mask > 0) > 0.95 and iou(recomputed >= 128, box > 0) < 0.2
