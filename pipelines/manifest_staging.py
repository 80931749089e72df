"""Every manifest read in byte ranges: a CSV, Parquet or gzipped manifest is first streamed,
by one worker task, into a JSONL copy under the run's prefix.

Only one uncompressed JSONL file can be split into byte ranges that each CPU task reads for
itself (pipelines/manifest.py). Read whole, any other manifest is one block that waits in the
object store until the CPU tasks have taken all of it (~300 B a row: ~3 GB at 10M rows). The
copy costs one sequential pass over the manifest and its size in storage until the commit
deletes it; every pass of the run (duplicate skus, the main pass, gate retries) then reads it
in ranges. The copy holds what the whole-file readers gave (CSV cells as text, Parquet values
as Python values), so the rows and error rows are those the file would have made, and a CSV
line with the wrong number of fields becomes one error row instead of failing the read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.manifest import OPTIONAL, REQUIRED, ROW_ERROR, ManifestError, manifest_format, reads_in_ranges
from pipelines.storage import StorageConfig, StreamingUpload, arrow_filesystem, exists, join, redact

log = logging.getLogger(__name__)

STAGED = "_manifest"  # the JSONL copy under the run prefix (deleted on commit)
BATCH_ROWS = 65_536


def stage_manifest(uri: str, storage: StorageConfig, run_prefix: str, columns: list[str]) -> str:
    """A manifest URI that reads in byte ranges: `uri` itself when it is one JSONL file, else
    its JSONL copy, written now by a worker task (or by an earlier attempt of this run, when
    the source file is unchanged: the copy is named by its URI, size and modification time)."""
    import ray

    if reads_in_ranges(uri, storage):
        return uri
    fs, path = arrow_filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ManifestError(f"manifest {uri} is not a file; give one JSONL, CSV or Parquet file")
    if not info.size:
        return uri  # nothing to copy: the whole-file reader gives no rows either
    name = hashlib.sha256(f"{uri}\x00{info.size}\x00{info.mtime_ns}".encode()).hexdigest()[:24]
    dest = join(run_prefix, STAGED, f"{name}.jsonl")
    if exists(dest, storage):
        log.info("manifest %s: reading the JSONL copy an earlier attempt wrote (%s)", redact(uri), redact(dest))
        return dest
    t0 = time.perf_counter()
    # One CPU task: the copy is a sequential read, and a driver must not do per-row work.
    task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(write_jsonl_copy)
    try:
        counts = ray.get(task.remote(uri, storage, dest, columns))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(exc.cause, Exception) else exc
        raise ManifestError(f"cannot read manifest {uri}: {cause}") from None
    log.info("manifest %s: %d rows (%d malformed) copied as JSONL to %s in %.1f s, so every pass reads it in byte ranges",
             redact(uri), counts["rows"], counts["malformed"], redact(dest), time.perf_counter() - t0)  # fmt: skip
    return dest


def write_jsonl_copy(uri: str, storage: StorageConfig, dest: str, columns: list[str]) -> dict[str, int]:
    """Stream the manifest at `uri` into JSONL at `dest`, one line per row: {"rows", "malformed"}."""
    fmt = manifest_format(uri)
    fs, path = arrow_filesystem(uri, storage)
    wanted = [c for c in columns if c in REQUIRED + OPTIONAL]
    counts = {"rows": 0, "malformed": 0}
    with StreamingUpload(dest, storage) as out:
        if fmt == "jsonl":  # gzipped: the lines as they are (a bad one is an error row later, as before)
            with fs.open_input_stream(path) as f:  # decompressed by the stream (detected from the name)
                last = b"\n"
                while piece := f.read(8 << 20):
                    out.write(piece)
                    counts["rows"] += piece.count(b"\n")
                    last = piece[-1:]
                if last != b"\n":
                    out.write(b"\n")
                    counts["rows"] += 1
            return counts
        for batch, malformed in _batches(fmt, fs, path, wanted):
            lines = [json.dumps(row, ensure_ascii=False, default=_jsonable) for row in batch.to_pylist()]
            lines += [json.dumps(bad, ensure_ascii=False) for bad in malformed]
            if lines:
                out.write(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
            counts["rows"] += batch.num_rows
            counts["malformed"] += len(malformed)
    return counts


def _batches(fmt: str, fs, path: str, wanted: list[str]):
    """(record batch, [error objects of malformed lines since the last batch]) in file order."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=wanted):
                yield batch, []
        return
    import pyarrow.csv as pacsv

    malformed: list[dict] = []

    def on_bad_line(row) -> str:
        where = f"CSV line {row.number}" if row.number is not None else "a CSV line"
        malformed.append({ROW_ERROR: f"{where} has {row.actual_columns} fields where the header has {row.expected_columns}; "
                                     "quote values that contain commas or quotes", "line": (row.text or "")[:200]})  # fmt: skip
        return "skip"

    # Cells as bytes, decoded with replacement when written (`_jsonable`): one byte that is not
    # UTF-8 makes one odd title, where text columns would fail the whole read.
    convert = pacsv.ConvertOptions(column_types={c: pa.binary() for c in wanted}, include_columns=wanted)
    parse = pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_bad_line)
    with fs.open_input_stream(path) as f:  # .csv.gz is decompressed by the stream (detected from the name)
        for batch in pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=8 << 20), parse_options=parse, convert_options=convert):
            yield batch, malformed[:]
            malformed.clear()
    if malformed:
        yield pa.RecordBatch.from_pylist([]), malformed


def _jsonable(v: Any):
    """Values JSON has no type for (CSV cells, Parquet binary, dates, decimals) as normalise_row
    reads them from the whole-file readers' rows: bytes as UTF-8, the rest with str()."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)
