"""What Ray Data's driver holds per block: the run's plan makes one block (one fused CPU task)
per `cpu_batch_size` rows, so a 10M-SKU night at the default batch of 4 is 2.5M blocks.

Each size runs in a fresh driver process: `range(rows)`, repartitioned to blocks of
`--rows-per-block`, one `map_batches` that passes rows through, `count()`. The driver's peak
RSS is sampled every 0.1 s; printed as growth over the smallest size, per 1,000 blocks.

    python -m bench.ray_blocks --blocks 1000 10000 40000 --json bench/results/ray_blocks-cpu2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time

import psutil


def _identity(batch):
    return batch


def probe(blocks: int, rows_per_block: int) -> dict:
    import ray

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.1)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    start = proc.memory_info().rss
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    ds = ray.data.range(blocks * rows_per_block).repartition(target_num_rows_per_block=rows_per_block)
    n = ds.map_batches(_identity, batch_size=rows_per_block, batch_format="pyarrow").count()
    wall = time.perf_counter() - t0
    stop.set()
    end = proc.memory_info().rss
    ray.shutdown()
    return {"blocks": blocks, "rows": n, "wall_s": round(wall, 1), "driver_start_mb": start >> 20, "driver_peak_mb": peak[0] >> 20, "driver_end_mb": end >> 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1000, 10000, 40000])
    ap.add_argument("--rows-per-block", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.one is not None:
        sys.stdout.write(json.dumps(probe(args.one, args.rows_per_block)) + "\n")
        return
    results = []
    for blocks in args.blocks:
        out = subprocess.run([sys.executable, "-m", "bench.ray_blocks", "--one", str(blocks), "--rows-per-block", str(args.rows_per_block)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        logging.info("%s", results[-1])
    base = results[0]
    for r in results[1:]:
        r["peak_growth_mb_per_1k_blocks"] = round((r["driver_peak_mb"] - base["driver_peak_mb"]) / ((r["blocks"] - base["blocks"]) / 1000), 2)
        logging.info("%d blocks: peak %d MB, +%.2f MB per 1,000 blocks over %d", r["blocks"], r["driver_peak_mb"], r["peak_growth_mb_per_1k_blocks"], base["blocks"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared VM)", "rows_per_block": args.rows_per_block, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
