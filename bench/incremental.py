"""A full nightly run vs an incremental run over the same, unchanged catalog, in one process:
wall time and peak memory (driver + every Ray process it started, sampled), as ratios.
Optionally a third run after changing a few source images, to show the work tracks the change.

    python bench/incremental.py --count 1000 --recipe enhance --changed 10
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from catalog_scale import Peaks  # bench/ is on sys.path when run as a script

from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import render_product, write_sample_catalog


def timed_run(cfg: RunConfig) -> dict:
    with Peaks(every_s=0.25) as mem:
        t0 = time.perf_counter()
        s = run_catalog(cfg)
        wall = time.perf_counter() - t0
    return {"run_id": s.run_id, "wall_s": round(wall, 2), "peak_rss_mb": round(mem.total / 2**20), "variants": s.variants,
            "generated": s.generated, "reused": s.reused, "errors": s.errors}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--recipe", action="append", default=None)
    ap.add_argument("--changed", type=int, default=10, help="source images to change before a third run (0: skip it)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipes = tuple(args.recipe or ["enhance"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="skustudio-bench-inc-"))
    t0 = time.perf_counter()
    manifest = write_sample_catalog(work / "catalog", args.count)
    print(f"catalog: {args.count} products in {time.perf_counter() - t0:.0f}s")

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    base = dict(manifest=str(manifest), recipes=recipes, output=str(work / "runs"))
    full = timed_run(RunConfig(**base, run_id="full"))
    print("full        ", full)
    again = timed_run(RunConfig(**base, run_id="nochange"))
    print("no change   ", again)
    results = {"full": full, "no_change": again}
    if args.changed:
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        for i, row in enumerate(rows[: args.changed]):
            from PIL import Image

            Image.fromarray(render_product(10_000 + i).photo).save(row["image_uri"], quality=90)
        changed = timed_run(RunConfig(**base, run_id="changed"))
        print(f"{args.changed} changed  ", changed)
        results["changed"] = changed
    ratio = full["wall_s"] / again["wall_s"]
    mem_ratio = full["peak_rss_mb"] / max(1, again["peak_rss_mb"])
    print(f"\nno-change run: {ratio:.1f}x faster than the full run (target >= 10x); peak memory {mem_ratio:.2f}x lower")
    print(f"device: {platform.machine()}, {os.cpu_count()} CPU cores, recipes {list(recipes)}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "speedup": round(ratio, 2), "memory_ratio": round(mem_ratio, 2),
                                               "cpus": os.cpu_count(), "recipes": list(recipes)}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
