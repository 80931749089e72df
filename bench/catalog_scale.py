"""Does the run stay flat as the catalog grows? 1k, 10k, 100k... SKU catalogs, each run three
times (full, no change, 1% of the source photos changed), measuring in one process:

- the driver's own peak RSS (this process only: what a head node must hold for the driver),
- the object store's peak bytes in use (sampled from the raylet),
- the peak RSS of everything (driver + Ray's processes), and wall time.

Images are small (128 px renders, varied per SKU so every source is distinct) so that a 100k
catalog fits an evening on two cores; the driver and object-store work per row does not
depend on the pixel count, which is what this measures.

    python bench/catalog_scale.py --counts 1000 10000 100000 --json bench/results/catalog_scale-cpu2.json

(default recipe: bench/recipes/scale.yaml, one cheap op, so the per-row pipeline work shows)
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import psutil

from cluster.connect import object_store_bytes_used
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import render_product

SIDE = 128
COPIES = 20  # SKUs per rendered template (rendering is the slow part of writing a catalog)


class Peaks:
    """Samples driver RSS, all-process RSS and object-store bytes in use, keeping the peaks."""

    def __init__(self, every_s: float = 0.5):
        self.every_s = every_s
        self.driver = self.total = self.store = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _store_bytes(self) -> int:
        return object_store_bytes_used()

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.driver = max(self.driver, me.memory_info().rss)
            self.total = max(self.total, total)
            self.store = max(self.store, self._store_bytes())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_catalog(out: Path, count: int) -> Path:
    """`count` distinct small JPEG sources from count/20 renders: each SKU's copy is
    cropped, mirrored and tinted its own way (so its perceptual hash differs from its
    template's, as real catalogs' photos do: otherwise the near-duplicate flags would be
    measuring a catalog of a few photos listed many times each) and stamped with its index."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    templates = [render_product(i, size=(SIDE, SIDE)) for i in range(max(1, count // COPIES))]
    with (out / "manifest.jsonl").open("w") as manifest:
        for i in range(count):
            r = templates[i % len(templates)]
            path = out / "images" / f"SKU-{i:07d}.jpg"
            _write_image(path, r.photo, i)
            manifest.write(json.dumps({"sku": f"SKU-{i:07d}", "image_uri": str(path), "title": r.title, "category": r.product}) + "\n")
    return out / "manifest.jsonl"


def _write_image(path: Path, photo: np.ndarray, stamp: int) -> None:
    rng = np.random.default_rng(stamp)
    dy, dx = rng.integers(0, SIDE // 3, 2)
    side = SIDE - max(dy, dx)
    img = cv2.resize(np.ascontiguousarray(photo[dy : dy + side, dx : dx + side]), (SIDE, SIDE), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    img = np.clip(img.astype(np.float32) * rng.uniform(0.7, 1.3, 3) + rng.uniform(-30, 30), 0, 255).astype(np.uint8)
    img[:8, :24] = np.frombuffer(int(stamp).to_bytes(3, "big") * 64, np.uint8).reshape(8, 24)[..., None]
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def write_catalog_in_child(out: Path, count: int, fmt: str = "jsonl") -> Path:
    """write_catalog (then `as_format`) in a spawned child process: rendering the templates, or
    pyarrow's memory pool after the conversion, would otherwise leave the measured process's
    RSS (the driver's) inflated (~115 KB per template, ~170 MB at 30k)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_write_as, out, count, fmt).result()


def _write_as(out: Path, count: int, fmt: str) -> Path:
    return as_format(write_catalog(out, count), fmt)


def as_format(manifest: Path, fmt: str) -> Path:
    """The JSONL manifest rewritten as Parquet (pyarrow's default row groups) or CSV beside it."""
    if fmt == "jsonl":
        return manifest
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    table = pajson.read_json(manifest)
    out = manifest.with_suffix(f".{fmt}")
    if fmt == "parquet":
        pq.write_table(table, out)
    else:
        pacsv.write_csv(table, out)
    return out


def measured(cfg: RunConfig, phases: bool = False) -> dict:
    """One run's peaks and counts; with `phases`, also the object store's peak in each phase
    of run_catalog (bench/catalog_phases.py's probe), to say which phase a peak belongs to."""
    import contextlib

    from bench.catalog_phases import PhaseProbe

    with Peaks() as p, (PhaseProbe() if phases else contextlib.nullcontext()) as probe:
        t0 = time.perf_counter()
        s = run_catalog(cfg)
        wall = time.perf_counter() - t0
    out = {"wall_s": round(wall, 1), "driver_peak_mb": round(p.driver / 2**20), "object_store_peak_mb": round(p.store / 2**20, 1),
           "object_store_peak_kb": round(p.store / 2**10), "all_processes_peak_mb": round(p.total / 2**20), "generated": s.generated, "reused": s.reused, "errors": s.errors}  # fmt: skip
    if probe is not None:
        out["store_peak_mb_by_phase"] = {r["phase"]: r["store_peak_mb"] for r in probe.records}
        # Two samplers (every 0.5 s and 0.3 s) catch different moments: the peak is the higher.
        out["object_store_peak_mb"] = max(out["object_store_peak_mb"], *out["store_peak_mb_by_phase"].values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--recipe", default=str(Path(__file__).parent / "recipes" / "scale.yaml"))
    ap.add_argument("--batch-size", type=int, default=64, help="rows per CPU task (small images: large batches, as a user would set)")
    ap.add_argument("--part-rows", type=int, default=None, help="rows per committed part file (default: the run's, 8192)")
    ap.add_argument("--changed", type=float, default=0.01, help="share of sources changed before the third run")
    ap.add_argument("--manifest-format", choices=("jsonl", "parquet", "csv"), default="jsonl", help="the catalog's manifest as written (parquet, csv: converted from the JSONL)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--phases", action="store_true", help="also record each run phase's object-store peak")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="skustudio-bench-scale-"))

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results: dict[str, dict] = {}
    for count in args.counts:
        t0 = time.perf_counter()
        manifest = write_catalog_in_child(work / f"cat-{count}", count, args.manifest_format)
        print(f"{count} skus: catalog written in {time.perf_counter() - t0:.0f}s", flush=True)
        base = dict(manifest=str(manifest), recipes=(args.recipe,), output=str(work / f"runs-{count}"), cpu_batch_size=args.batch_size)
        if args.part_rows:
            base["part_rows"] = args.part_rows
        runs = {"full": measured(RunConfig(**base, run_id="full"), args.phases)}
        print("  full     ", runs["full"], flush=True)
        runs["no_change"] = measured(RunConfig(**base, run_id="nochange"), args.phases)
        print("  no change", runs["no_change"], flush=True)
        changed = max(1, int(count * args.changed))
        for i in range(0, count, count // changed)[:changed]:
            r = render_product(i % max(1, count // COPIES), size=(SIDE, SIDE))
            _write_image(work / f"cat-{count}" / "images" / f"SKU-{i:07d}.jpg", 255 - r.photo, i)
        runs["changed"] = {**measured(RunConfig(**base, run_id="changed"), args.phases), "sources_changed": changed}
        print("  changed  ", runs["changed"], flush=True)
        results[str(count)] = runs

    first = results[str(args.counts[0])]
    print("\nratios to the smallest catalog (flat: 10x the SKUs within 1.2x, 100x within 1.5x):")
    for count in args.counts[1:]:
        r = results[str(count)]
        for run in ("full", "no_change", "changed"):
            print(f"  {count:>7} {run:<9} driver {r[run]['driver_peak_mb'] / first[run]['driver_peak_mb']:.2f}x, "
                  # Floored at 1 MB (a peak that small is a block or two: the ratio of two such is noise), raw beside it.
                  f"object store {r[run]['object_store_peak_mb'] / max(first[run]['object_store_peak_mb'], 1):.2f}x "
                  f"(raw {r[run]['object_store_peak_mb'] / max(first[run]['object_store_peak_mb'], 0.01):.1f}x), "
                  f"wall per sku {r[run]['wall_s'] / count / (first[run]['wall_s'] / args.counts[0]):.2f}x")  # fmt: skip
    device = f"{platform.machine()}, {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU"
    print(f"device: {device}; recipe {args.recipe}; {SIDE} px sources; {args.manifest_format} manifest")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "recipe": args.recipe, "side_px": SIDE, "manifest_format": args.manifest_format, "results": results}, indent=2))


if __name__ == "__main__":
    main()
