"""A contact sheet of a recipe's ops on real photos, to look at (not a benchmark number).

    python bench/contact_sheet.py --photos ../shared/photos --recipe marketplace-main --out /tmp/sheet.jpg

Runs the recipe's ops in this process (no Ray) on every photo and writes one JPEG: per photo
the source, the product matte, and the result, captioned with score_mask_confidence and the
gate's verdict, or the row's error. Keep the sheet out of the repository: the photos' licences
allow looking, not redistribution.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ops.base import Item, OpInputError, identity_affine  # noqa: E402
from ops.codec import decode_image  # noqa: E402
from ops.scores import quality_scores  # noqa: E402
from pipelines.recipes import load_recipe  # noqa: E402

TILE = 220


def _tile(img: np.ndarray | None, caption: str, colour=(0, 0, 0)) -> np.ndarray:
    tile = np.full((TILE + 18, TILE, 3), 255, np.uint8)
    if img is not None:
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, 2)
        s = TILE / max(img.shape[:2])
        small = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))), interpolation=cv2.INTER_AREA)
        tile[: small.shape[0], : small.shape[1]] = small
    cv2.putText(tile, caption[:38], (2, TILE + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.36, colour, 1, cv2.LINE_AA)
    return tile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "photos"))
    ap.add_argument("--recipe", default="marketplace-main")
    ap.add_argument("--out", default="/tmp/contact-sheet.jpg")
    ap.add_argument("--columns", type=int, default=3, help="photos per row of the sheet")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    paths = sorted(p for p in pathlib.Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not paths:
        print(f"no photos under {args.photos}", file=sys.stderr)
        return 2
    groups, passed = [], 0
    for path in paths:
        src = decode_image(path.read_bytes())
        item = Item(src.image, src.alpha, identity_affine(), 0, {"sku": path.stem, "title": path.stem})
        matte = None
        try:
            for step in recipe.steps:
                item = step.op.apply(item)
                if step.op.name == "remove_background":
                    matte = item.mask
            scores = {**quality_scores(item.image, source=src.image, mask=item.mask, affine=item.affine), **item.scores}
            reasons = [r for r in recipe.gate(scores) if not r.startswith("compliance")]
            passed += not reasons
            conf = scores.get("score_mask_confidence")
            verdict = "pass" if not reasons else "REJECT " + reasons[0].split("=")[0].removeprefix("score_")
            caption, colour = f"conf {conf:.2f} {verdict}" if conf is not None else verdict, (0, 120, 0) if not reasons else (200, 0, 0)
            result = item.image
        except OpInputError as exc:
            caption, colour, result = f"ERROR {exc}", (200, 0, 0), None
        groups.append(np.concatenate([_tile(src.image, path.stem[:38]), _tile(matte, "matte"), _tile(result, caption, colour)], 1))
        print(f"{path.name}: {caption}", flush=True)
    while len(groups) % args.columns:
        groups.append(np.full_like(groups[0], 255))
    rows = [np.concatenate(groups[i : i + args.columns], 1) for i in range(0, len(groups), args.columns)]
    cv2.imwrite(args.out, cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"{passed}/{len(paths)} passed the gate; sheet: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
