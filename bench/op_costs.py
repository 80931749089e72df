"""Per-op CPU cost of the built-in recipes on real photos, against a decode/resize/encode floor.

    python bench/op_costs.py [--photos ../shared/photos] [--recipe marketplace-main --recipe enhance] [--limit 24]

One process, one thread (OpenCV and onnxruntime pinned to one, the way a Ray CPU task runs
them). For each recipe: milliseconds per image for every op, for the finish work (scores,
compliance, encode), and in total; and the floor, a plain decode + resize to the recipe's
output size + JPEG encode of the same photo, measured in the same process. The ratio
total / floor is the number to watch (machines here are shared: absolute times drift, the
ratio much less).

remove_background's model arithmetic (onnxruntime's `run`) is also reported on its own line,
`segmentation model`, taken out of remove_background's: on a GPU pool that part leaves the
CPU, and the line `CPU without the model` is what the CPU workers would still spend (the GPU
worker's own host time is in bench/salient_gpu.py).
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import time
from collections import defaultdict

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ops.base import Item, OpInputError, identity_affine  # noqa: E402
from ops.codec import decode_image, encode_image  # noqa: E402
from ops.compliance import Subject, evaluate  # noqa: E402
from ops.scores import quality_scores  # noqa: E402
from ops.salient_runtime import OrtRunner  # noqa: E402
from pipelines.recipes import load_recipe  # noqa: E402

MODEL_SECONDS = [0.0]  # time inside the segmentation graph since the last read


def _timed_run(run):
    def wrapper(self, x):
        t = time.perf_counter()
        try:
            return run(self, x)
        finally:
            MODEL_SECONDS[0] += time.perf_counter() - t

    return wrapper


OrtRunner.run = _timed_run(OrtRunner.run)


def floor_ms(data: bytes, out_side: int | None) -> float:
    """Decode + resize to the output's long side + JPEG q92: the least any variant costs."""
    t0 = time.perf_counter()
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if out_side:
        s = out_side / max(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    encode_image(img, "JPEG", 92)
    return 1000 * (time.perf_counter() - t0)


def output_side(recipe) -> int | None:
    for step in recipe.steps:
        if step.op.name in ("compose", "fit_channel"):
            return getattr(step.op.config, "size", None)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "photos"))
    ap.add_argument("--recipe", action="append", default=[])
    ap.add_argument("--limit", type=int, default=24, help="photos to use (largest first)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    paths = [p for p in pathlib.Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not paths:
        print(f"no photos under {args.photos}", file=sys.stderr)
        return 2
    paths = sorted(paths, key=lambda p: -p.stat().st_size)[: args.limit]
    results = {}
    for name in args.recipe or ["marketplace-main", "enhance"]:
        recipe = load_recipe(name)
        side = output_side(recipe)
        per_op: dict[str, list[float]] = defaultdict(list)
        floors, totals = [], []
        for path in paths:
            data = path.read_bytes()
            floors.append(floor_ms(data, side))
            t0 = time.perf_counter()
            src = decode_image(data)
            per_op["decode"].append(1000 * (time.perf_counter() - t0))
            item = Item(src.image, src.alpha, identity_affine(), 0, {"sku": path.stem, "title": path.stem})
            try:
                for step in recipe.steps:
                    t = time.perf_counter()
                    MODEL_SECONDS[0] = 0.0
                    item = step.op.apply(item)
                    per_op[step.op.name].append(1000 * (time.perf_counter() - t - MODEL_SECONDS[0]))
                    if step.op.name == "remove_background":
                        per_op["segmentation model"].append(1000 * MODEL_SECONDS[0])
            except OpInputError:
                continue  # a refused row costs what it cost; not a variant
            t = time.perf_counter()
            quality_scores(item.image, source=src.image, mask=item.mask, affine=item.affine)
            blob = encode_image(item.image, recipe.spec.output.pil_format, recipe.spec.output.quality)
            evaluate(Subject(image=item.image, mask=item.mask, fmt=recipe.spec.output.pil_format, n_bytes=len(blob)))
            per_op["finish"].append(1000 * (time.perf_counter() - t))
        ops = {op: float(np.mean(v)) for op, v in per_op.items()}
        total = sum(ops.values())
        floor = float(np.mean(floors))
        cpu_only = total - ops.get("segmentation model", 0.0)
        results[name] = {
            "photos": len(paths), "ms_per_op": ops, "ms_per_variant": total, "floor_ms": floor, "ratio_to_floor": total / floor,
            "ms_without_model": cpu_only, "ratio_without_model": cpu_only / floor,
        }
        print(f"\n{name}: {total:.0f} ms per variant, floor {floor:.0f} ms, ratio {total / floor:.1f}x ({len(paths)} photos)")
        if "segmentation model" in ops:
            print(f"  CPU without the model: {cpu_only:.0f} ms, ratio {cpu_only / floor:.1f}x")
        for op, ms in sorted(ops.items(), key=lambda kv: -kv[1]):
            print(f"  {op:18s} {ms:8.1f} ms  {ms / total:5.1%}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
