"""Marketplace rules catch planted violations with the right reasons, pass a correctly
composed main image, and fit_channel turns violating images into passing ones."""

from __future__ import annotations

import numpy as np
import pytest

from ops.base import NO_MASK, Item, identity_affine
from ops.codec import encode_image
from ops.compliance import Subject, channels, compliance_columns, evaluate
from ops.compose import Compose
from ops.fit_channel import FitChannel
from ops.overlay import StampWatermarkConfig, stamp_text
from pipelines.sample_catalog import PRODUCTS, render_product


def _item(seed: int, size=(900, 900)) -> Item:
    r = render_product(seed, background="plain", degradation="none", size=size)
    return Item(r.clean, r.mask, identity_affine(), 0, {})


def _main_image(seed: int, **compose) -> Item:
    return Compose({"size": 1600, "fill": 0.87, **compose}).apply(_item(seed))


def _check(item: Item, fmt: str = "JPEG", **kw) -> dict:
    data = encode_image(item.image, fmt, 92)
    return evaluate(Subject(image=item.image, mask=item.mask, fmt=fmt, n_bytes=len(data), **kw))


@pytest.mark.parametrize("seed", range(len(PRODUCTS)))
def test_a_composed_main_image_passes_amazon(seed):
    out = _check(_main_image(seed))
    assert out["compliance_amazon_main"], out["compliance_notes"]
    assert out["compliance_amazon_main_recommended_long_side"]


@pytest.mark.parametrize(
    "violation, rule, reason",
    [
        ("grey background", "white_background", "background is not white"),
        ("60% fill", "fill", "product fills 60%"),
        ("400 px", "min_long_side", "longest side is 400 px"),
        ("text overlay", "no_overlay", "text or watermark strokes"),
        ("cropped", "not_cropped", "touches the frame"),
        ("webp", "format", "format WEBP"),
    ],
)
def test_planted_violations_fail_amazon_with_the_right_reason(violation, rule, reason):
    fmt = "JPEG"
    if violation == "grey background":
        item = _main_image(1, background=[200, 200, 200])
    elif violation == "60% fill":
        item = _main_image(1, fill=0.6)
    elif violation == "400 px":
        item = _main_image(1, size=400)
    elif violation == "text overlay":
        base = _main_image(1)
        item = base.with_image(stamp_text(base.image, StampWatermarkConfig(text="SALE 50% OFF", color=(40, 40, 40), position="top_left", opacity=1.0)))
    elif violation == "cropped":
        item = _main_image(1, fill=1.0)
    else:
        item, fmt = _main_image(1), "WEBP"
    out = _check(item, fmt)
    assert not out[f"compliance_amazon_main_{rule}"]
    assert not out["compliance_amazon_main"]
    note = next(n for n in out["compliance_notes"] if n.startswith(f"amazon_main.{rule}:"))
    assert reason in note, note
    # Nothing else fails, except that text on a white background, or a product running off
    # the frame, also makes the background not white, which is true.
    failed = {n.split(":")[0] for n in out["compliance_notes"] if n.startswith("amazon_main.") and "(recommended)" not in n}
    also = {"amazon_main.white_background"} if violation in ("text overlay", "cropped") else set()
    assert {f"amazon_main.{rule}"} <= failed <= {f"amazon_main.{rule}"} | also, out["compliance_notes"]


def test_google_and_shopify_rules():
    small = _main_image(2, size=400)
    out = _check(small)
    assert not out["compliance_google_merchant_min_size"] and not out["compliance_shopify_zoom_size"]
    framed = _main_image(2)
    img = framed.image.copy()
    img[:12], img[-12:], img[:, :12], img[:, -12:] = 20, 20, 20, 20
    out = _check(framed.with_image(img))
    assert not out["compliance_google_merchant_no_border"]
    ai = _check(_main_image(2), ai_generated=True)
    assert not ai["compliance_google_merchant_ai_label"] and not ai["compliance_google_merchant"]
    assert _check(_main_image(2), ai_generated=True, ai_labelled=True)["compliance_google_merchant"]
    # Recommended rules are reported but do not fail the channel: 1600 px is not 2048.
    out = _check(_main_image(2))
    assert out["compliance_shopify"] and not out["compliance_shopify_recommended_size"]


@pytest.mark.parametrize("channel", sorted(channels()))
def test_fit_channel_makes_violating_images_pass(channel):
    violating = [
        _item(3, size=(2000, 1600)),  # photo-sized, product at its natural fill, mask known
        _main_image(3, fill=0.6, size=1200),
        Item(_main_image(3, fill=0.6, size=1200).image, NO_MASK, identity_affine(), 0, {}),  # no mask
    ]
    for item in violating:
        fixed = FitChannel({"channel": channel, "max_upscale": 3.0}).apply(item)
        out = _check(fixed)
        assert out[f"compliance_{channel}"], (channel, out["compliance_notes"])
        if channel == "shopify":
            assert out["compliance_shopify_recommended_square"] and out["compliance_shopify_recommended_size"]


def test_fit_channel_refuses_to_blow_up_a_tiny_product():
    tiny = _item(4, size=(120, 120))
    with pytest.raises(Exception, match="add an upscale step"):
        FitChannel({"channel": "amazon_main", "max_upscale": 2.0}).apply(tiny)


def test_every_rule_has_a_column():
    cols = compliance_columns()
    assert "compliance_amazon_main_white_background" in cols and "compliance_google_merchant" in cols
    assert len(cols) == len(set(cols)) == sum(1 + len(c.rules) for c in channels().values())
    assert np.all([c.startswith("compliance_") for c in cols])


def test_marketplace_main_outputs_pass_amazon_on_the_sample_catalog(tmp_path):
    """Done-when of the compliance work: the built-in main-image recipe, on every kind of
    sample product and backdrop (plain, gradient, textured, cluttered; with degradations)."""
    import json
    from pathlib import Path

    from ops.codec import decode_image
    from pipelines.recipes import load_recipe
    from pipelines.sample_catalog import write_sample_catalog

    recipe = load_recipe("marketplace-main")
    manifest = write_sample_catalog(tmp_path / "cat", 12)
    failures = {}
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        src = decode_image(Path(row["image_uri"]).read_bytes())
        item = Item(src.image, src.alpha, identity_affine(), 0, {})
        for step in recipe.steps:
            item = step.op.apply(item)
        out = _check(item)
        if not out["compliance_amazon_main"]:
            failures[row["sku"]] = out["compliance_notes"]
    assert failures == {}


def test_tiny_images_are_judged_not_crashed():
    one = Item(np.full((1, 1, 3), (200, 10, 10), np.uint8), NO_MASK, identity_affine(), 0, {})
    out = _check(one, "PNG")
    assert not out["compliance_amazon_main"] and not out["compliance_amazon_main_min_long_side"]
    assert not any("could not be checked" in n for n in out["compliance_notes"]), out["compliance_notes"]
