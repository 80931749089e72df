"""The commit sink: the run's rows -> RUN/variants/*.parquet and RUN/errors/*.parquet.

Written through the same storage layer as images (boto3 with the run's retry and
server-side-encryption settings), in one pass over the rows. Part files are named by a hash
of the rows they hold, so a retried write task replaces its own file instead of adding a
second copy, and both prefixes are cleared first, so a commit interrupted halfway and redone
never leaves a stale part beside the new ones.
"""

from __future__ import annotations

import hashlib
import logging

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.schema import ERROR_SCHEMA, OUTPUT_SCHEMA, VARIANT_SCHEMA
from pipelines.storage import StorageConfig, delete_objects, join, list_objects, write_bytes

log = logging.getLogger(__name__)

TABLES = (("variant", "variants", VARIANT_SCHEMA), ("error", "errors", ERROR_SCHEMA))
# Rows per part file (default of `RunConfig.part_rows`, `--part-rows`): the journal is read
# back in blocks of about this many rows (whole journal files), and each block is written as
# one part file by the task that read it, so the rows never wait in the object store (8192 rows
# is ~16 MB of a worker's heap and a few-MB zstd file).
ROWS_PER_FILE = 8192


class WriteTables:
    def __init__(self, run_prefix: str, storage: StorageConfig):
        self.run_prefix = run_prefix
        self.storage = storage

    def __call__(self, table: pa.Table) -> pa.Table:
        written = []
        for kind, sub, schema in TABLES:
            part = table.filter(pc.equal(table["kind"], kind)).select(schema.names).cast(schema)
            if not len(part):
                continue
            keys = "\n".join(sorted(f"{s}\x00{r}\x00{v}\x00{m}" for s, r, v, m in zip(*(part[c].to_pylist() for c in _key_columns(kind)))))
            name = f"part-{hashlib.sha256(keys.encode('utf-8', 'surrogatepass')).hexdigest()[:24]}.parquet"
            buf = pa.BufferOutputStream()
            pq.write_table(part, buf, compression="zstd")
            write_bytes(join(self.run_prefix, sub, name), buf.getvalue().to_pybytes(), self.storage, "application/vnd.apache.parquet")
            written.append(len(part))
        return pa.table({"rows": pa.array([sum(written)], pa.int64())})


def _key_columns(kind: str) -> tuple[str, ...]:
    return ("sku", "recipe", "variant", "output_uri") if kind == "variant" else ("sku", "recipe", "variant", "message")


def write_tables(rows, run_prefix: str, storage: StorageConfig) -> int:
    """Clear RUN/variants and RUN/errors, then write the rows; returns rows written."""
    stale = [u for sub in ("variants", "errors") for u in list_objects(join(run_prefix, sub), storage)]
    if stale:
        log.info("clearing %d part files left by an interrupted commit", len(stale))
        delete_objects(stale, storage)
    return sum(r["rows"] for r in written_parts(rows, run_prefix, storage).take_all())


def written_parts(rows, run_prefix: str, storage: StorageConfig):
    """The lazy commit: one part file per block and table, a row count per block back. Whole
    blocks and default resources, so Ray Data fuses it with the journal read and the flags
    before it (tests/pipelines/test_commit_fusion.py)."""
    return rows.map_batches(WriteTables(run_prefix, storage), batch_format="pyarrow", batch_size=None)


def dedupe_repeated_rows(rows, duplicates: tuple[tuple[str, str, int], ...]):
    """Fold the output of manifest rows repeated verbatim (same sku and image) into one set.
    Only the few skus the duplicate pass named are gathered on the driver. Returns the rows
    and how many were folded."""
    skus = sorted({sku for sku, _, _ in duplicates})
    if not skus:
        return rows, 0
    import ray

    wanted = pa.array(skus, pa.string())

    def pick(table: pa.Table, keep: bool) -> pa.Table:
        mask = pc.fill_null(pc.is_in(table["sku"], value_set=wanted), False)
        return table.filter(mask if keep else pc.invert(mask))

    dup_rows = rows.map_batches(pick, fn_kwargs={"keep": True}, batch_format="pyarrow", batch_size=None).take_all()
    if not dup_rows:
        return rows, 0
    seen: dict[tuple, dict] = {}
    for r in dup_rows:
        key = (r["kind"], r["sku"], r["source_uri"], r["recipe"], r["variant"], r["attempt"], r["stage"], r["message"])
        seen.setdefault(key, r)
    folded = len(dup_rows) - len(seen)
    rest = rows.map_batches(pick, fn_kwargs={"keep": False}, batch_format="pyarrow", batch_size=None)
    kept = pa.Table.from_pylist(list(seen.values()), schema=OUTPUT_SCHEMA)
    return rest.union(ray.data.from_arrow(kept)), folded
