"""Does the report's memory stay flat as the run grows? Writes synthetic committed runs of N
variants (part files of 8192 rows, the commit's size; realistic columns: scores, every
compliance verdict, op_seconds, reasons, 5% gate rejections on the mask) and renders each
run's report in a fresh child process, printing its peak RSS and time.

    python bench/report_memory.py --counts 100000 1000000 [--json bench/results/report_memory-cpu2.json]

No images are read: the contact sheets' thumbnails come back empty (their URIs point nowhere),
which is what this measures around.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_FILE = 8192


def write_run(run: Path, count: int, seed: int = 0) -> None:
    """A committed run of `count` variants (two recipes, ~2 per SKU) and count/100 error rows."""
    from ops.compliance import compliance_columns
    from pipelines.schema import ERROR_SCHEMA, VARIANT_SCHEMA

    rng = np.random.default_rng(seed)
    (run / "variants").mkdir(parents=True, exist_ok=True)
    (run / "errors").mkdir(exist_ok=True)
    for start in range(0, count, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, count - start)
        idx = np.arange(start, start + n)
        sku = pa.array([f"SKU-{i // 2:08d}" for i in idx])
        doubtful = rng.random(n) < 0.05
        passed = ~doubtful & (rng.random(n) < 0.9)
        reasons = [["score_mask_confidence 0.31 < 0.5"] if d else ([] if p else ["score_width 800 < 1000"]) for d, p in zip(doubtful, passed)]
        cols = {
            "run_id": pa.array(["bench"] * n), "sku": sku, "recipe": pa.array(np.where(idx % 2 == 0, "marketplace-main", "enhance")),
            "variant": pa.array(np.zeros(n, np.int32)), "attempt": pa.array(np.ones(n, np.int32)),
            "source_uri": pa.array([f"s3://nowhere/src/{i // 2:08d}.jpg" for i in idx]),
            "output_uri": pa.array([f"s3://nowhere/out/{i:09d}.jpg" for i in idx]),
            "passed": pa.array(passed), "reasons": pa.array(reasons, pa.list_(pa.string())),
            "duration_s": pa.array(rng.uniform(0.5, 5, n)),
            "op_seconds": pa.array([[("decode", 0.07), ("remove_background", 3.0), ("finish", 0.5)]] * n, pa.map_(pa.string(), pa.float64())),
            **{c: pa.array(rng.uniform(0, 100, n)) for c in ("score_sharpness", "score_colorfulness", "score_noise_sigma", "score_fidelity_ciede2000", "score_fidelity_ssim")},
            "score_mask_confidence": pa.array(rng.uniform(0, 1, n)),
            **{c: pa.array(rng.random(n) < 0.8) for c in compliance_columns()},
        }  # fmt: skip
        table = pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type) for f in VARIANT_SCHEMA}, schema=VARIANT_SCHEMA)
        pq.write_table(table, run / "variants" / f"part-{start // ROWS_PER_FILE:06d}.parquet", compression="zstd")
    n_err = max(1, count // 100)
    errors = {"sku": pa.array([f"ERR-{i:08d}" for i in range(n_err)]), "source_uri": pa.array([f"s3://nowhere/bad/{i}.jpg" for i in range(n_err)]),
              "stage": pa.array(["decode"] * n_err), "error_type": pa.array(["DecodeError"] * n_err), "message": pa.array(["not an image"] * n_err)}  # fmt: skip
    pq.write_table(pa.table({f.name: errors[f.name] if f.name in errors else pa.nulls(n_err, f.type) for f in ERROR_SCHEMA}, schema=ERROR_SCHEMA), run / "errors" / "part-0.parquet")
    record = {"run_id": "bench", "counts": {"inputs": count // 2 + n_err}, "timings": {"execute_s": 1.0}, "recipes": {"marketplace-main": {}, "enhance": {}}}
    (run / "_run.json").write_text(json.dumps(record))


def render_once(run: str) -> dict:
    """In a child process: the report's peak RSS over the process's baseline after imports."""
    from pipelines.report import write_report
    from pipelines.storage import StorageConfig

    base = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    write_report(run, StorageConfig())
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20), "peak_over_imports_mb": round((peak - base) / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="skustudio-bench-report-"))
    results = {}
    ctx = multiprocessing.get_context("spawn")
    for count in args.counts:
        run = work / f"run-{count}"
        if not (run / "_run.json").exists():
            write_run(run, count)
        with ctx.Pool(1) as pool:
            results[str(count)] = r = pool.apply(render_once, (str(run),))
        print(f"{count:>9} variants: report in {r['wall_s']} s, peak RSS {r['peak_rss_mb']} MB ({r['peak_over_imports_mb']} MB over the imports)", flush=True)
    first = results[str(args.counts[0])]
    for count in args.counts[1:]:
        r = results[str(count)]
        print(f"{count} / {args.counts[0]}: peak RSS {r['peak_rss_mb'] / first['peak_rss_mb']:.2f}x for {count / args.counts[0]:.0f}x the variants")
    device = f"{platform.machine()}, {os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "results": results}, indent=2))


if __name__ == "__main__":
    main()
