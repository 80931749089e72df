"""What does the near-duplicate flag step add to a run's commit, as the catalog grows?

Writes a synthetic journal of `--skus` SKUs (two variants each, random 64-bit hashes; every
`--share-every`th SKU lists a near-copy of the previous SKU's photo, and every tenth SKU's
second variant repeats its first), then, in one Ray session, reads it back two ways and
counts the rows in the reading tasks:

- baseline: the journal read alone (what the commit reads anyway);
- flagged: `flag_duplicates` on the workers path, then the same read and count;
- the baseline again (the faster of the two is the base).

Prints the object store's and the driver's peaks and the wall time of each, the flagged run
against the baseline, and checks the flags against what the synthetic catalog holds.

    python bench/duplicate_flags.py --skus 100000 [--json bench/results/duplicate_flags-100k-cpu2.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench.catalog_scale import Peaks
from pipelines.schema import OUTPUT_SCHEMA
from pipelines.state import attempt_dir, journal_file_name
from pipelines.storage import StorageConfig

ROWS_PER_BLOCK = 8192  # the commit's default part size (pipelines/sink.py ROWS_PER_FILE)


def write_journal(run_prefix: Path, skus: int, file_rows: int, share_every: int, seed: int = 0) -> dict:
    """The journal files; returns how many rows should carry each flag."""
    rng = random.Random(seed)
    rows, expected = [], {"repeats": 0, "shared_skus": 0}
    prev_src = None
    for i in range(skus):
        src = rng.getrandbits(64)
        if share_every and i % share_every == 1 and prev_src is not None:
            src = prev_src ^ 1  # one bit from the previous SKU's photo: both are flagged
            expected["shared_skus"] += 2
        prev_src = src
        first = rng.getrandbits(64)
        second = first ^ 3 if i % 10 == 0 else rng.getrandbits(64)
        expected["repeats"] += i % 10 == 0
        for v, h in enumerate((first, second)):
            rows.append({"kind": "variant", "sku": f"SKU-{i:08d}", "recipe": "main", "variant": v, "attempt": 1,
                         "phash": f"{h:016x}", "source_phash": f"{src:016x}", "passed": True})  # fmt: skip
    out = Path(attempt_dir(str(run_prefix), 1))
    out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(rows), file_rows):
        batch = rows[k : k + file_rows]
        pq.write_table(pa.Table.from_pylist(batch, schema=OUTPUT_SCHEMA), out / journal_file_name(f"{k:032x}", len(batch)))
    return expected


def _count(table: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    dup = pc.sum(pc.is_valid(table["duplicate_of_variant"])).as_py() or 0
    shared = pc.sum(pc.fill_null(pc.greater(pc.list_value_length(table["shared_source_skus"]), 0), False)).as_py() or 0
    return pa.table({"rows": [len(table)], "dup": [dup], "shared": [shared]})


def measure(name: str, make_dataset) -> dict:
    me = psutil.Process()
    start_mb = me.memory_info().rss / 2**20
    t0 = time.perf_counter()
    totals = {"rows": 0, "dup": 0, "shared": 0}
    with Peaks(every_s=0.2) as peaks:
        ds = make_dataset()
        for b in ds.map_batches(_count, batch_format="pyarrow", batch_size=None).iter_batches(batch_size=None, batch_format="numpy"):
            for k in totals:
                totals[k] += int(b[k].sum())
    wall = time.perf_counter() - t0
    rec = {"phase": name, "wall_s": round(wall, 2), "store_peak_mb": round(peaks.store / 2**20, 2),
           "driver_start_mb": round(start_mb, 1), "driver_peak_mb": round(peaks.driver / 2**20, 1), **totals}  # fmt: skip
    print(f"{name:>9}: {wall:7.1f} s, object store peak {rec['store_peak_mb']:7.2f} MB, driver {start_mb:5.0f} -> {rec['driver_peak_mb']:5.0f} MB, "
          f"{totals['rows']} rows, {totals['dup']} flagged as repeats, {totals['shared']} as sharing a photo", flush=True)  # fmt: skip
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skus", type=int, default=100_000)
    ap.add_argument("--file-rows", type=int, default=128, help="rows per journal file (one Finish batch's)")
    ap.add_argument("--share-every", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    import ray

    from pipelines.duplicates import flag_duplicates
    from pipelines.state import journal_rows

    with tempfile.TemporaryDirectory() as tmp:
        run_prefix = Path(tmp) / "run"
        t0 = time.perf_counter()
        expected = write_journal(run_prefix, args.skus, args.file_rows, args.share_every)
        print(f"journal: {2 * args.skus} rows in files of {args.file_rows} ({time.perf_counter() - t0:.1f} s); expected {expected}", flush=True)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        storage = StorageConfig()
        try:  # this version: the search reads the journal itself
            from pipelines.state import Journal

            journal = Journal(str(run_prefix), 1, storage, ROWS_PER_BLOCK)
            flagged = lambda: flag_duplicates(journal, n_variants=None)  # noqa: E731
        except ImportError:  # versions before it (flag_duplicates(rows)): the baseline for comparison
            journal = None
            flagged = lambda: flag_duplicates(journal_rows(str(run_prefix), 1, storage, ROWS_PER_BLOCK), n_variants=None)  # noqa: E731
        ray.data.range(8).map_batches(lambda b: b).count()  # Ray Data's start-up, outside both
        read = lambda: journal_rows(str(run_prefix), 1, storage, ROWS_PER_BLOCK)  # noqa: E731
        # Baseline before and after the flagged read: its faster run is the base.
        records = [measure("baseline", read), measure("flagged", flagged), measure("baseline", read)]
        ray.shutdown()
    flag = records[1]
    base = min((records[0], records[2]), key=lambda r: r["wall_s"])
    ratio = {"wall": round(flag["wall_s"] / base["wall_s"], 2),
             "store_mb_over_baseline": round(flag["store_peak_mb"] - base["store_peak_mb"], 2),
             "driver_mb_over_baseline": round(flag["driver_peak_mb"] - base["driver_peak_mb"], 1)}  # fmt: skip
    # Each repeat flags one row (variant 1); each SKU sharing a photo flags both its variants.
    ok = flag["dup"] == expected["repeats"] and flag["shared"] == 2 * expected["shared_skus"]
    print(f"flagged / baseline: wall {ratio['wall']}x; object store +{ratio['store_mb_over_baseline']} MB; driver +{ratio['driver_mb_over_baseline']} MB; "
          f"flags as expected: {ok}", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"skus": args.skus, "expected": expected, "records": records, "ratio": ratio, "flags_ok": ok}, indent=2))


if __name__ == "__main__":
    main()
