"""Product segmentation on real photos with human masks: IoU, confidence gate, cost.

    python bench/segmentation.py [--data ../shared/segmentation] [--only 'default;grabcut'] [--json out.json]

For each configuration of `remove_background` it prints mean / median IoU, the share of photos
under 0.5 and at or over 0.8, milliseconds per photo on this machine (one thread, the way a Ray
CPU task runs it), and for configurations that report `score_mask_confidence` the two gate
rates at the recipes' threshold: the share of bad cutouts (IoU < 0.5) rejected and of good ones
(IoU >= 0.8) passed. Times are also given as a ratio to the raw model in the same process.

The photos are for measurement only (see their README): this script reads them in place and
writes nothing but its report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ops.background import MASK_CONFIDENCE, RemoveBackground  # noqa: E402
from ops.base import NO_MASK, Item, identity_affine  # noqa: E402

GATE = 0.5  # the `score_mask_confidence: {min: 0.5}` of the built-in recipes

# name -> remove_background params. `raw` is the model as rembg runs it: one pass at 320 px,
# no flip, no clean-up, the probability map resized to the photo; the rest add one idea each.
CONFIGS: dict[str, dict] = {
    "grabcut": {"method": "grabcut"},
    "raw": {"escalate_below": None, "scales": [1.0], "flip": False, "min_island": 0, "refine_radius": 0, "ramp": 0.5, "threshold": 0.5},
    "flip": {"escalate_below": None, "scales": [1.0], "flip": True, "min_island": 0, "refine_radius": 0, "ramp": 0.5, "threshold": 0.5},
    "scales": {"escalate_below": None, "scales": [0.8, 1.0, 1.2], "flip": False, "min_island": 0, "refine_radius": 0, "ramp": 0.5, "threshold": 0.5},
    "flip+scales": {"escalate_below": None, "scales": [0.8, 1.0, 1.2], "flip": True, "min_island": 0, "refine_radius": 0, "ramp": 0.5, "threshold": 0.5},
    "flip+scales+islands": {"escalate_below": None, "scales": [0.8, 1.0, 1.2], "flip": True, "refine_radius": 0, "ramp": 0.5, "threshold": 0.5},
    "flip+scales+islands+guided r4": {"escalate_below": None, "scales": [0.8, 1.0, 1.2], "flip": True, "refine_radius": 4, "ramp": 0.5, "threshold": 0.5},
    "flip+scales+islands+guided r2": {"escalate_below": None, "scales": [0.8, 1.0, 1.2], "flip": True, "ramp": 0.5, "threshold": 0.5},
    "default": {},
    "every pass (escalate_below: null)": {"escalate_below": None},
    "escalate below 0.8": {"escalate_below": 0.8},
    "escalate below 0.9": {"escalate_below": 0.9},
    "default+min_island=0.25": {"escalate_below": None, "min_island": 0.25},
    "default, scales 0.9/1.1": {"escalate_below": None, "scales": [0.9, 1.1]},
    "default, scales 0.8/1.2": {"escalate_below": None, "scales": [0.8, 1.2]},
    # Cheaper escalations: what the unsure photos get after the first look.
    "one look, default clean-up": {"escalate_below": None, "scales": [1.0], "flip": False},
    "escalate 0.95 to the mirror only": {"scales": [1.0]},
    "escalate 0.95 to scales 1.0/1.2 + mirror": {"scales": [1.0, 1.2]},
    "escalate 0.95 to scales 0.8/1.0 + mirror": {"scales": [0.8, 1.0]},
    "escalate 0.95 to scales 0.8/1.0/1.2, no mirror": {"flip": False},
    "escalate 0.95 to scales 0.6/0.8/1.0 + mirror": {"scales": [0.6, 0.8, 1.0]},
}


def load(data: pathlib.Path):
    for jpg in sorted(data.glob("*.jpg")):
        gt = np.asarray(Image.open(jpg.with_suffix(".mask.png"))) > 127
        ign = jpg.with_suffix(".ignore.png")
        keep = np.asarray(Image.open(ign)) <= 127 if ign.exists() else np.ones_like(gt)
        yield jpg.stem, np.asarray(Image.open(jpg).convert("RGB")), gt, keep


def iou(pred: np.ndarray, gt: np.ndarray, keep: np.ndarray) -> float:
    union = ((pred | gt) & keep).sum()
    return float((pred & gt & keep).sum() / union) if union else 1.0


def evaluate(params: dict, photos) -> dict:
    op = RemoveBackground(params)
    op.ensure_setup()
    ious, confidences, seconds = [], [], []
    for _name, rgb, gt, keep in photos:
        item = Item(rgb, NO_MASK, identity_affine(), 0, {})
        t0 = time.perf_counter()
        try:
            out = op.apply(item)
            pred, conf = out.mask > 127, out.scores.get(MASK_CONFIDENCE)
        except ValueError:  # "no product found": an empty mask
            pred, conf = np.zeros_like(gt), 0.0
        seconds.append(time.perf_counter() - t0)
        ious.append(iou(pred, gt, keep))
        confidences.append(conf)
    ious_a = np.asarray(ious)
    result = {
        "mean_iou": float(ious_a.mean()),
        "median_iou": float(np.median(ious_a)),
        "share_under_0_5": float(np.mean(ious_a < 0.5)),
        "share_at_least_0_8": float(np.mean(ious_a >= 0.8)),
        "ms_per_image": 1000 * float(np.mean(seconds)),
        "n": len(ious),
    }
    if all(c is not None for c in confidences):
        conf_a = np.asarray(confidences, float)
        bad, good = ious_a < 0.5, ious_a >= 0.8
        result["bad_rejected"] = float(np.mean(conf_a[bad] < GATE)) if bad.any() else None
        result["good_passed"] = float(np.mean(conf_a[good] >= GATE)) if good.any() else None
        result["n_bad"], result["n_good"] = int(bad.sum()), int(good.sum())
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "segmentation"))
    ap.add_argument("--only", default="", help="configuration names, separated by ';'")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    data = pathlib.Path(args.data)
    if not data.is_dir():
        print(f"no photos at {data}; pass --data", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)
    photos = list(load(data))
    names = [n for n in args.only.split(";") if n] or list(CONFIGS)
    results = {}
    for name in names:
        results[name] = r = evaluate(CONFIGS[name], photos)
        gate = f"  gate: bad rejected {r['bad_rejected']:.0%} of {r['n_bad']}, good passed {r['good_passed']:.0%} of {r['n_good']}" if "bad_rejected" in r else ""
        print(f"{name:28s} mean {r['mean_iou']:.3f}  median {r['median_iou']:.3f}  <0.5 {r['share_under_0_5']:.0%}  "
              f">=0.8 {r['share_at_least_0_8']:.0%}  {r['ms_per_image']:.0f} ms/image{gate}", flush=True)  # fmt: skip
    if "raw" in results:
        for name, r in results.items():
            r["time_vs_raw"] = r["ms_per_image"] / results["raw"]["ms_per_image"]
        print("time vs raw: " + ", ".join(f"{n} {r['time_vs_raw']:.2f}x" for n, r in results.items()))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"photos": len(photos), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
