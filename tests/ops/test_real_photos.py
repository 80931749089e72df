"""The ops on real product photos from ../shared/photos (skipped where absent)."""

from __future__ import annotations

import numpy as np

from ops.base import NO_MASK, Item, identity_affine
from ops.codec import decode_image
from ops.registry import op_class
from ops.scores import quality_scores


def test_marketplace_chain_on_real_on_white_packshots(shared_photos):
    photos = sorted(p for p in shared_photos.glob("GroceryStoreDataset__*.jpg"))[:3]
    assert photos
    for path in photos:
        src = decode_image(path.read_bytes()).image
        item = Item(src, NO_MASK, identity_affine(), 0, {})
        for op, cfg in (("remove_background", {}), ("compose", {"size": 1000, "fill": 0.85, "max_upscale": 8})):
            item = op_class(op)(cfg).apply(item)
        img = item.image
        assert (img[:4] == 255).all() and (img[-4:] == 255).all()
        ys, xs = np.nonzero(item.mask >= 128)
        fill = max(np.ptp(xs) + 1, np.ptp(ys) + 1) / 1000
        assert abs(fill - 0.85) < 0.02
        # The cut-out should be the carton, not a sliver: at least 20% of the frame.
        assert (item.mask >= 128).mean() > 0.2
        s = quality_scores(img, source=src, mask=item.mask, affine=item.affine)
        assert s["score_fidelity_ciede2000"] < 5.0, (path.name, s["score_fidelity_ciede2000"])


def test_denoise_on_real_photo_with_added_noise(shared_photos):
    from ops.metrics import psnr

    path = sorted(shared_photos.glob("dreambooth__can_0*.jpg"))[0]
    clean = decode_image(path.read_bytes()).image[::2, ::2].copy()
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 12, clean.shape) + 0.5, 0, 255).astype(np.uint8)
    out = op_class("denoise")({}).apply(Item(noisy, NO_MASK, identity_affine(), 0, {})).image
    assert psnr(out, clean) > psnr(noisy, clean) + 3
