"""What a prior-state lookup costs a worker once a catalog has more shards than a worker keeps.

Baseline (the design before pipelines/prior_index.py): shards of SHARD_ROWS rows, each read
whole and indexed as dicts, 8 kept per worker. Now: shards sorted by sku and cut into pages;
a batch's lookups read one page per sku (ranged reads), a few pages kept per worker.

Both answer the same random lookups, in batches of 64 as a stage asks, over the same rows on
local disk, in one process; printed as the ratio of the baseline's time per lookup to the
paged design's. Rows are synthetic but shaped like committed variant rows (every column of
VARIANT_SCHEMA filled), since decoding rows to dicts is most of the work.

    python -m bench.prior_lookup --rows 200000 --json bench/results/prior_lookup-200k-cpu2.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import random
import tempfile
import time
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import prior_index
from pipelines.schema import VARIANT_SCHEMA
from pipelines.state import PriorState, prior_rows_many, shard_of, with_shards
from pipelines.storage import StorageConfig, join

OLD_SHARD_ROWS = 20_000  # the baseline's shard size and cache (a75ab0a)
OLD_CACHED_SHARDS = 8


def _value(field: pa.Field, i: int, rnd: random.Random):
    t = field.type
    if pa.types.is_string(t):
        return hashlib.sha256(f"{field.name}{i}".encode()).hexdigest()[: rnd.choice((16, 40, 64))]
    if pa.types.is_floating(t):
        return rnd.random()
    if pa.types.is_integer(t):
        return rnd.randrange(1000)
    if pa.types.is_boolean(t):
        return rnd.random() < 0.5
    if pa.types.is_map(t):
        return [(k, rnd.random()) for k in ("decode", "sharpen", "finish")]
    if pa.types.is_list(t):
        return [hashlib.md5(f"{i}{k}".encode()).hexdigest() for k in range(2)]
    return None


def synthetic_rows(n: int, seed: int = 0) -> pa.Table:
    rnd = random.Random(seed)
    template = [{f.name: _value(f, i, rnd) for f in VARIANT_SCHEMA} for i in range(512)]
    rows = []
    for i in range(n):
        row = dict(template[i % len(template)])
        row.update(sku=f"SKU-{i:09d}", recipe="scale", variant=0, attempt=1)
        rows.append(row)
    table = pa.Table.from_pylist(rows, schema=VARIANT_SCHEMA)
    return table.append_column("origin", pa.array(["committed"] * n, pa.string()))


def build_paged(table: pa.Table, root: str, storage: StorageConfig, shards: int) -> PriorState:
    prefix = join(root, "paged")
    keyed = with_shards(table, shards)
    for k in range(0, len(keyed), 65_536):
        prior_index.scatter(keyed.slice(k, 65_536), prefix, storage, f"t{k}")
    present = frozenset(s for s in range(shards) if prior_index.gather(s, prefix, storage))
    return PriorState(prefix=prefix, shards=shards, present=present, storage=storage, rows=len(table))


def build_whole(table: pa.Table, root: str) -> tuple[str, int]:
    shards = max(1, -(-len(table) // OLD_SHARD_ROWS))
    keyed = with_shards(table, shards)
    for s in range(shards):
        part = keyed.filter(pa.compute.equal(keyed["shard"], s)).drop_columns(["shard"])
        pq.write_table(part, os.path.join(root, f"whole-{s:05d}.parquet"), compression="zstd")
    return root, shards


class WholeShardLookups:
    """The baseline: a shard read whole and indexed, OLD_CACHED_SHARDS kept."""

    def __init__(self, root: str, shards: int):
        self.root, self.shards = root, shards
        self.cache: OrderedDict[int, dict] = OrderedDict()

    def rows(self, sku: str) -> list[dict]:
        shard = shard_of(sku, self.shards)
        index = self.cache.get(shard)
        if index is None:
            index = {}
            for row in pq.read_table(os.path.join(self.root, f"whole-{shard:05d}.parquet")).to_pylist():
                index.setdefault(row["sku"], []).append(row)
            self.cache[shard] = index
            while len(self.cache) > OLD_CACHED_SHARDS:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(shard)
        return index.get(sku, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="prior rows (the baseline thrashes above 8 x 20k)")
    ap.add_argument("--lookups", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    storage = StorageConfig()
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory() as root:
        table = synthetic_rows(args.rows)
        paged = build_paged(table, root, storage, shards=max(1, -(-args.rows // 50_000)))
        whole_root, whole_shards = build_whole(table, root)
        del table
        skus = [f"SKU-{rnd.randrange(args.rows):09d}" for _ in range(args.lookups)]
        # Same lookups, same order; each design's caches start cold.
        prior_index.clear_cache()
        t0 = time.perf_counter()
        found_paged = 0
        for k in range(0, len(skus), args.batch):
            found_paged += sum(1 for rows in prior_rows_many(paged, skus[k : k + args.batch]).values() if rows)
        paged_s = time.perf_counter() - t0
        whole = WholeShardLookups(whole_root, whole_shards)
        t0 = time.perf_counter()
        found_whole = sum(1 for s in skus if whole.rows(s))
        whole_s = time.perf_counter() - t0
    assert found_paged == found_whole == len(skus), (found_paged, found_whole)
    result = {
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared VM)",
        "prior_rows": args.rows,
        "lookups": args.lookups,
        "whole_shards": {"shards": whole_shards, "cached": OLD_CACHED_SHARDS, "ms_per_lookup": round(1000 * whole_s / len(skus), 3)},
        "paged": {"shards": paged.shards, "page_rows": prior_index.PAGE_ROWS, "ms_per_lookup": round(1000 * paged_s / len(skus), 3)},
        "ratio_whole_over_paged": round(whole_s / paged_s, 1),
    }
    logging.info(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
