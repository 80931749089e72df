"""Generative ops on tiny random-weight models (loaded from disk like real weights): shapes,
determinism, the product-untouched guarantee measured with the fidelity score, and clear
errors for models that are missing, corrupt or of the wrong type."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from ops.base import Item, OpInputError, batch_of, identity_affine
from ops.metrics import psnr
from ops.models import ModelError, content_sha256, describe_local
from ops.prompts import render
from ops.registry import op_class
from ops.scores import fidelity
from pipelines.sample_catalog import render_product

FAST = {"size": 64, "steps": 2}


def _product(seed: int = 0, kind: str = "box", size: int = 128):
    r = render_product(seed, product=kind, background="plain", degradation="none", size=(size, size))
    return r.photo, r.mask


def _batch(items, **context):
    n = len(items)
    cols = {"title": ["leather tote bag"] * n, "category": ["bags"] * n, "attributes": ['{"color": "tan"}'] * n}
    cols.update(context)
    return batch_of(items, {"image": None, **cols})


def _items(n=3, size=128):
    out = []
    for i in range(n):
        image, mask = _product(i, ("box", "bottle", "bag")[i % 3], size)
        out.append(Item(image, mask, identity_affine(), 1000 + i, {}))
    return out


@pytest.mark.parametrize(
    "op_name, model, extra",
    [("scene", "sd_inpaint", {}), ("scene", "sd", {}), ("restyle", "sd", {"strength": 0.6}), ("instruct_edit", "sd_instruct", {})],
)
def test_generative_op_keeps_the_product_pixels(tiny_models, op_name, model, extra):
    op = op_class(op_name)({"model": str(tiny_models[model]), **FAST, **extra})
    items = _items()
    out = op(_batch(items))
    for it, image, mask, affine in zip(items, out["image"], out["mask"], out["affine"]):
        assert image.shape == it.image.shape and image.dtype == np.uint8
        f = fidelity(image, it.image, mask, affine)
        assert f["score_fidelity_ciede2000"] < 1.0
        # Stronger than the score: 2 px inside the edge, the pixels are the source's own bits.
        core = cv2.erode((mask >= 128).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert np.array_equal(image[core], it.image[core])
        # ... while the background really was regenerated.
        background = mask < 128
        assert np.abs(image[background].astype(int) - it.image[background]).mean() > 5


def test_same_seed_same_image_other_seed_other_image(tiny_models):
    op = op_class("scene")({"model": str(tiny_models["sd_inpaint"]), **FAST})
    items = _items(2)
    a = op(_batch(items))["image"]
    b = op(_batch(items))["image"]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    items[0].seed += 1
    c = op(_batch(items))["image"]
    assert not np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])


def test_a_row_gives_the_same_image_alone_or_in_a_batch(tiny_models):
    op = op_class("scene")({"model": str(tiny_models["sd_inpaint"]), **FAST})
    items = _items(3)
    together = op(_batch(items))["image"]
    alone = op(_batch(items[1:2]))["image"][0]
    # On the CPU each row is its own pipeline call: bit for bit (a GPU batch is within ~2/255).
    assert np.array_equal(together[1], alone)


def test_outpaint_reaches_the_aspect_and_keeps_every_original_pixel(tiny_models):
    op = op_class("outpaint")({"model": str(tiny_models["sd_inpaint"]), "aspect": "16:9", **FAST})
    items = _items(2, size=120)
    out = op(_batch(items))
    for it, image, mask, affine in zip(items, out["image"], out["mask"], out["affine"]):
        h, w = image.shape[:2]
        assert (h, w) == (120, round(120 * 16 / 9))
        dx = int(affine[0, 2])
        assert np.array_equal(image[:, dx : dx + 120], it.image)
        assert np.array_equal(mask[:, dx : dx + 120], it.mask) and not mask[:, :dx].any()
        assert fidelity(image, it.image, mask, affine)["score_fidelity_ciede2000"] < 0.01
        assert image[:, :dx].std() > 1  # the new margin is generated, not a flat fill


def test_segment_variants_paints_each_segment_with_its_prompt(tiny_models):
    segs = [{"id": "outdoor", "prompt": "{title} on a mountain trail"}, {"id": "office", "prompt": "{title} on an office desk"}]
    op = op_class("segment_variants")({"model": str(tiny_models["sd_inpaint"]), "segments": segs, **FAST})
    assert op.segment_ids() == ["outdoor", "office"]
    items = _items(1) * 2
    out = op(_batch(items, segment=["outdoor", "office"]))["image"]
    assert not np.array_equal(out[0], out[1])  # same seed, different prompt
    with pytest.raises(OpInputError, match="segment 'kids'"):
        op(_batch(items[:1], segment=["kids"]))


def test_generative_ops_refuse_rows_without_a_product_mask(tiny_models):
    op = op_class("scene")({"model": str(tiny_models["sd_inpaint"]), **FAST})
    image, _ = _product()
    item = Item(image, np.zeros((0, 0), np.uint8), identity_affine(), 0, {})
    with pytest.raises(OpInputError, match="put remove_background before scene"):
        op.check_item(item)


def test_prompt_templates_fill_from_the_row_and_tidy_missing_fields():
    ctx = {"title": "Trail Shoe", "category": "", "attributes": json.dumps({"color": "red", "size": 42})}
    assert render("photo of {title}, {category}, {attributes.color} color, {attributes.material}", ctx) == "photo of Trail Shoe, red color"
    assert render("{attributes}", ctx) == "color: red, size: 42"
    with pytest.raises(Exception, match="unknown field"):
        op_class("scene")({"model": "x", "prompt": "photo of {name}"})


# ------------------------------------------------------------------------ model type checks


def test_wrong_model_types_are_named(tiny_models):
    with pytest.raises(ModelError, match="9 input channels"):
        op_class("restyle")({"model": str(tiny_models["sd_inpaint"])}).check_model("model", describe_local(str(tiny_models["sd_inpaint"])))
    with pytest.raises(ModelError, match="StableDiffusionPipeline"):
        op_class("instruct_edit")({"model": str(tiny_models["sd"])}).check_model("model", describe_local(str(tiny_models["sd"])))
    with pytest.raises(ModelError, match="checkpoint file"):
        op_class("scene")({"model": "m"}).check_model("model", describe_local(str(tiny_models["esrgan_x2"])))
    with pytest.raises(ModelError, match="diffusers StableDiffusionPipeline directory"):
        op_class("upscale")({"model": "m.pth"}).check_model("model", describe_local(str(tiny_models["sd"])))
    # Same file type, other purpose: only loading tells an inpainting GAN from a super-resolver.
    with pytest.raises(ModelError, match="LaMa Inpainting model"):
        op_class("upscale")({"model": str(tiny_models["lama"])}).ensure_setup()


def test_missing_and_corrupt_models_are_clear_errors(tiny_models, tmp_path):
    with pytest.raises(ModelError, match="not found"):
        op_class("scene")({"model": str(tmp_path / "nope")}).ensure_setup()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tiny_models["esrgan_x2"].read_bytes()[:5000])
    with pytest.raises(ModelError, match="broken.safetensors.*could not be loaded"):
        op_class("upscale")({"model": str(broken)}).ensure_setup()
    sd = tmp_path / "sd-truncated"
    shutil.copytree(tiny_models["sd"], sd)
    weights = next((sd / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match="sd-truncated.*failed to load"):
        op_class("scene")({"model": str(sd), **FAST}).ensure_setup()
    (sd / "vae" / "config.json").unlink()
    shutil.rmtree(sd / "text_encoder")
    with pytest.raises(ModelError, match="'text_encoder' is listed in model_index.json but its folder is missing"):
        describe_local(str(sd))


def test_content_hash_ignores_where_the_model_sits(tiny_models, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny_models["sd"], copy)
    assert content_sha256(copy) == content_sha256(tiny_models["sd"])
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert content_sha256(copy) != content_sha256(tiny_models["sd"])


# ------------------------------------------------------------------------ GAN ops


@pytest.mark.parametrize("params, size", [({"factor": 2}, (256, 192)), ({"long_side": 500}, (500, 375)), ({"width": 301, "height": 203}, (301, 203))])
def test_upscale_output_size_is_exact_and_geometry_follows(tiny_models, params, size):
    image = cv2.resize(_product(2, "bottle", 128)[0], (128, 96))
    mask = cv2.resize(_product(2, "bottle", 128)[1], (128, 96), interpolation=cv2.INTER_NEAREST)
    op = op_class("upscale")({"model": str(tiny_models["esrgan_x2"]), "tile": 48, "overlap": 8, **params})
    out = op(_batch([Item(image, mask, identity_affine(), 0, {})]))
    w, h = size
    assert out["image"][0].shape == (h, w, 3) and out["mask"][0].shape == (h, w)
    # The affine maps source pixels onto the output: the mask, warped back, is the source mask.
    inv = cv2.invertAffineTransform(out["affine"][0])
    back = cv2.warpAffine(out["mask"][0], inv, (128, 96), flags=cv2.INTER_LINEAR)
    iou = ((back >= 128) & (mask >= 128)).sum() / ((back >= 128) | (mask >= 128)).sum()
    assert iou > 0.95


def test_tiled_upscale_matches_one_pass(tiny_models):
    image = _product(1, "bag", 160)[0]
    base = {"model": str(tiny_models["esrgan_x2"]), "factor": 2}
    whole = op_class("upscale")({**base, "tile": 1024})(_batch([Item(image, np.zeros((0, 0), np.uint8), identity_affine(), 0, {})]))["image"][0]
    tiled = op_class("upscale")({**base, "tile": 48, "overlap": 16})(_batch([Item(image, np.zeros((0, 0), np.uint8), identity_affine(), 0, {})]))["image"][0]
    assert whole.shape == tiled.shape == (320, 320, 3)
    assert psnr(whole, tiled) > 40  # no visible seams


def test_inpaint_gan_changes_only_the_overlay_region(tiny_models):
    image, mask = _product(0, "box", 128)
    overlay = np.zeros(image.shape[:2], np.uint8)
    overlay[60:70, 20:110] = 255
    op = op_class("inpaint_gan")({"model": str(tiny_models["lama"]), "mask": "given", "dilate": 2})
    out = op(_batch([Item(image, mask, identity_affine(), 0, {})], overlay_mask=[overlay]))["image"][0]
    grown = cv2.dilate(overlay, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    assert np.array_equal(out[grown == 0], image[grown == 0])
    assert not np.array_equal(out[overlay > 0], image[overlay > 0])
    # 'given' with no mask on the row leaves it alone.
    same = op(_batch([Item(image, mask, identity_affine(), 0, {})], overlay_mask=[np.zeros((0, 0), np.uint8)]))["image"][0]
    assert np.array_equal(same, image)


def test_real_super_resolution_beats_bicubic_on_real_photos(shared_photos):
    from ops.codec import decode_image

    weights = shared_photos.parent / "weights"
    models = [weights / "FSRCNN_Tensorflow__FSRCNN_x2.pb", weights / "TF-ESPCN__ESPCN_x2.pb"]
    if not all(m.is_file() for m in models):
        pytest.skip("../shared/weights has no dnn_superres graphs")
    photos = sorted(p for p in shared_photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:6]
    assert photos
    for model in models:
        op = op_class("upscale")({"model": str(model), "factor": 2})
        assert op.resources.gpus == 0  # OpenCV graphs run on CPU workers
        gains = []
        for p in photos:
            src = decode_image(p.read_bytes()).image
            s = min(1.0, 800 / max(src.shape[:2]))
            w, h = int(src.shape[1] * s) // 2 * 2, int(src.shape[0] * s) // 2 * 2
            src = cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)
            small = cv2.resize(src, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
            bicubic = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
            sr = op(_batch([Item(small, np.zeros((0, 0), np.uint8), identity_affine(), 0, {})]))["image"][0]
            assert sr.shape == src.shape
            gains.append(psnr(sr, src) - psnr(bicubic, src))
        assert np.mean(gains) > 0.3 and min(gains) > 0, (model.name, gains)
