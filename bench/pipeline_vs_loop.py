"""Throughput of a skustudio run on local Ray vs a plain single-process loop doing the same
work (decode, the same recipe ops, scores, encode, write) over the same sample catalog, in
the same process run. Prints images/s and the ratio; machines here are shared and noisy, so
only the ratio is meaningful.

    python bench/pipeline_vs_loop.py --count 24 --recipe enhance --recipe marketplace-main
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from ops.base import NO_MASK, Item, identity_affine
from ops.codec import decode_image, encode_image
from ops.scores import quality_scores
from pipelines.recipes import load_recipe
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import write_sample_catalog


def plain_loop(images: list[Path], recipes, out: Path) -> int:
    n = 0
    for path in images:
        src = decode_image(path.read_bytes())
        for r in recipes:
            item = Item(src.image, src.alpha, identity_affine(), 0, {})
            for step in r.steps:
                item = step.op.apply(item)
            quality_scores(item.image, source=src.image, mask=item.mask if item.mask.size else NO_MASK, affine=item.affine)
            data = encode_image(item.image, r.spec.output.pil_format, r.spec.output.quality)
            (out / f"{hashlib.sha256(data).hexdigest()[:16]}.jpg").write_bytes(data)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--recipe", action="append", default=None)
    args = ap.parse_args()
    recipe_refs = args.recipe or ["enhance", "marketplace-main"]
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_sample_catalog(tmp / "cat", args.count)
        images = sorted((tmp / "cat" / "images").glob("*.jpg"))
        recipes = [load_recipe(r) for r in recipe_refs]
        (tmp / "loop").mkdir()

        t0 = time.perf_counter()
        n_loop = plain_loop(images, recipes, tmp / "loop")
        loop_s = time.perf_counter() - t0

        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
        run_catalog(RunConfig(manifest=str(manifest), recipes=("enhance",), output=str(tmp / "warm"), run_id="w"))  # warm workers
        t0 = time.perf_counter()
        s = run_catalog(RunConfig(manifest=str(manifest), recipes=tuple(recipe_refs), output=str(tmp / "out"), run_id="b"))
        pipe_s = time.perf_counter() - t0
        ray.shutdown()

    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (no GPU ops in these recipes)")
    print(f"recipes: {', '.join(recipe_refs)}; {args.count} products")
    print(f"plain loop (1 process):   {n_loop} variants in {loop_s:6.1f}s = {n_loop / loop_s:5.2f} images/s")
    print(f"skustudio on local Ray:   {s.variants} variants in {pipe_s:6.1f}s = {s.variants / pipe_s:5.2f} images/s (incl. Parquet, _run.json)")
    print(f"ratio pipeline / loop:    {(s.variants / pipe_s) / (n_loop / loop_s):.2f}x")


if __name__ == "__main__":
    main()
