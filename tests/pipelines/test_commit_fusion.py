"""The commit reads the journal back in blocks of about `part_rows` rows and writes each block
as one part file in the task that read it: journal read, near-duplicate flags and the Parquet
write fuse into one Ray Data task, so the catalog's rows never wait in the object store for a
writer's bundle to fill (that bundle was the object store's peak at 10k SKUs and up;
bench/catalog_phases.py). Both flag paths (driver search and worker search) must fuse, and
every row must land in exactly one part file."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.duplicates import flag_duplicates
from pipelines.schema import OUTPUT_SCHEMA
from pipelines.sink import write_tables, written_parts
from pipelines.state import UNCOUNTED_JOURNAL_ROWS, Journal, attempt_dir, journal_file_name, journal_file_rows, journal_groups, journal_rows
from pipelines.storage import StorageConfig


def test_journal_files_group_by_the_rows_their_names_carry():
    files = [f"j/a0001/{k:02d}.r{n}.parquet" for k, n in enumerate([40, 40, 30, 100, 5, 5, 5])]
    groups = journal_groups(files, rows_per_block=64)
    # whole files, in order, a new group once the last reached 64 rows
    assert [[f.split("/")[-1][:2] for f in g] for g in groups] == [["00", "01"], ["02", "03"], ["04", "05", "06"]]
    assert journal_file_rows(journal_file_name("ab" * 16, 12)) == 12
    assert journal_file_rows("s3://b/run/_journal/a0001/0123abcd.parquet") == UNCOUNTED_JOURNAL_ROWS  # named by an older version
    assert journal_groups(files, rows_per_block=1) == [[f] for f in files]


def _journal(run_prefix: Path, sizes: list[int]) -> list[dict]:
    rows, k = [], 0
    for i, n in enumerate(sizes):
        batch = []
        for _ in range(n):
            kind = "error" if k % 17 == 0 else "variant"
            batch.append({"kind": kind, "sku": f"S{k:04d}", "recipe": "r", "variant": 0, "attempt": 1, "message": "bad photo" if kind == "error" else None,
                          "output_uri": None if kind == "error" else f"out/S{k:04d}.jpg", "phash": f"{k % 5:016x}", "source_phash": f"{k:016x}"})  # fmt: skip
            k += 1
        path = Path(attempt_dir(str(run_prefix), 1)) / journal_file_name(f"{i:032x}", n)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(batch, schema=OUTPUT_SCHEMA), path)
        rows += batch
    return rows


@pytest.mark.parametrize("search", ["driver", "workers"])
def test_journal_read_flags_and_write_run_as_one_task(ray_session, tmp_path, search):
    run_prefix = tmp_path / "run"
    rows = _journal(run_prefix, [24] * 9 + [7])  # 223 rows in 10 files
    storage = StorageConfig()
    ds = flag_duplicates(Journal(str(run_prefix), 1, storage, rows_per_block=96), n_variants=len(rows) if search == "driver" else None)

    parts = written_parts(ds, str(run_prefix), storage)
    written = sum(r["rows"] for r in parts.take_all())

    # 1. One fused operator from the journal's file names to the part files.
    stats = parts.stats()
    fused = [line for line in stats.splitlines() if "WriteTables" in line and line.lstrip().startswith("Operator")]
    assert len(fused) == 1 and "_read_journal" in fused[0] and "flag" in fused[0].lower(), stats
    # 2. Blocks of 96 rows: groups of 4 + 4 + 2 files -> 3 variant parts and 3 error parts.
    variant_parts = sorted((run_prefix / "variants").glob("*.parquet"))
    error_parts = sorted((run_prefix / "errors").glob("*.parquet"))
    assert len(variant_parts) == 3 and len(error_parts) == 3
    # 3. Every row once, flagged.
    committed = pa.concat_tables([pq.read_table(p) for p in variant_parts])
    assert written == len(rows)
    assert sorted(committed["sku"].to_pylist()) == sorted(r["sku"] for r in rows if r["kind"] == "variant")
    assert sum(pq.read_table(p).num_rows for p in error_parts) == sum(r["kind"] == "error" for r in rows)
    assert committed["shared_source_skus"].null_count < len(committed) or committed["duplicate_of_variant"].null_count < len(committed)


def test_write_tables_clears_a_half_done_commit(ray_session, tmp_path):
    run_prefix = tmp_path / "run"
    rows = _journal(run_prefix, [30, 30])
    stale = run_prefix / "variants" / "part-stale.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an interrupted commit")
    storage = StorageConfig()
    assert write_tables(journal_rows(str(run_prefix), 1, storage, rows_per_block=1000), str(run_prefix), storage) == len(rows)
    assert not stale.exists() and len(list((run_prefix / "variants").glob("*.parquet"))) == 1
