"""Catalog manifests: JSONL, CSV or Parquet, local or s3://.

The header is checked on the driver before any work (a missing required column stops the
run with a message naming it); rows are parsed on workers, and a bad row becomes an error
row instead of failing its block.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.storage import StorageConfig, StorageError, arrow_filesystem, is_s3, split_s3

REQUIRED = ("sku", "image_uri")
OPTIONAL = ("title", "category", "attributes", "recipes", "overlay_mask_uri")
MAX_SKU_LEN = 512
# A row object holding only this key (and the offending `line`) stands for a line the source
# format could not split into fields (pipelines/manifest_staging.py): it becomes an error row.
ROW_ERROR = "_manifest_error"


class ManifestError(ValueError):
    """The manifest cannot be used at all (missing file or required column)."""


def manifest_format(uri: str) -> str:
    lower = uri.lower().removesuffix(".gz")
    for ext, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet")):
        if lower.endswith(ext):
            return fmt
    raise ManifestError(f"cannot tell the manifest format of {uri!r}; name it *.jsonl, *.csv or *.parquet")


def check_columns(uri: str, storage: StorageConfig) -> list[str]:
    """Columns the manifest has; raises ManifestError naming a missing required column."""
    fmt = manifest_format(uri)
    fs, path = arrow_filesystem(uri, storage)
    try:
        if fmt == "parquet":
            columns = pq.read_schema(path, filesystem=fs).names
        else:
            with fs.open_input_stream(path) as f:
                head = f.read(1 << 20).decode("utf-8", "replace")
            columns = _csv_columns(head) if fmt == "csv" else _jsonl_columns(head)
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {uri}") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {uri}: {exc}") from None
    for col in REQUIRED:
        if col not in columns:
            raise ManifestError(
                f"manifest {uri} has no {col!r} column (columns: {', '.join(columns) or 'none'}); "
                f"every manifest needs {' and '.join(REQUIRED)}"
            )
    return columns


def _csv_columns(head: str) -> list[str]:
    reader = csv.reader(io.StringIO(head))
    return [c.strip() for c in next(reader, [])]


def _jsonl_columns(head: str, sample: int = 100) -> list[str]:
    # A column counts as present when any of the first parseable rows has it: one bad row
    # should become an error row, not stop the run.
    seen: dict[str, None] = {}
    for line in head.splitlines()[:sample]:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            seen.update(dict.fromkeys(obj))
    return list(seen)


def read_manifest(uri: str, storage: StorageConfig, columns: list[str], *, chunk_rows: int | None = None, num_cpus: float = 0.25, ranges_per_block: int = 1):
    """A Ray Dataset of raw manifest rows. JSONL is read as text so that a malformed line is
    one error row instead of a failed block.

    With `chunk_rows`, an uncompressed JSONL file is read as byte ranges of about that many
    rows, each by the task that goes on to use its rows (map with the same `num_cpus` after
    this and Ray Data fuses them). The manifest then never waits in the object store for a
    CPU: as one Read operator, a one-file manifest was read ahead whole (~300 B a row, ~3 GB at
    10M rows, bench/catalog_phases.py). Other formats and `.gz` are read whole.

    Each block describes one chunk as `ranges_per_block` rows of its index: Ray Data bundles
    input blocks into a fused task until they hold as many rows as the largest batch size in
    the chain, so a chain batching by N rows must see N descriptor rows per block to get one
    chunk per task. The blocks are in the object store for the whole pass (Ray puts them up
    front), so they are one uint32 column: ~0.8 KB a block, where (start, end) int64 rows took
    ~1.7 KB, and no Python dict per row on the driver (docs/benchmarks.md)."""
    import ray

    fmt = manifest_format(uri)
    fs, path = arrow_filesystem(uri, storage)
    size = chunk_rows and reads_in_ranges(uri, storage)
    if size:
        step = chunk_rows * _bytes_per_line(fs, path)
        k = max(1, ranges_per_block)
        blocks = [pa.table({"chunk": np.full(k, i, np.uint32)}) for i in range(len(byte_ranges(size, step)))]
        # from_blocks (a DeveloperAPI) keeps one block per chunk and reads their metadata here;
        # from_arrow ran a Ray task per block for it (~40 KB of driver memory a block).
        return ray.data.from_blocks(blocks).map_batches(
            _read_jsonl_chunks, fn_kwargs={"uri": uri, "storage": storage, "step": step, "size": size}, batch_format="pyarrow", batch_size=None, num_cpus=num_cpus
        )  # fmt: skip
    if fmt == "jsonl":
        return ray.data.read_text(path, filesystem=fs).map_batches(_parse_jsonl_lines, batch_format="pyarrow", num_cpus=num_cpus)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        wanted = [c for c in columns if c in REQUIRED + OPTIONAL]
        convert = pacsv.ConvertOptions(column_types={c: "string" for c in columns}, include_columns=wanted)
        return ray.data.read_csv(path, filesystem=fs, convert_options=convert)
    return ray.data.read_parquet(path, filesystem=fs, columns=[c for c in columns if c in REQUIRED + OPTIONAL])


def reads_in_ranges(uri: str, storage: StorageConfig) -> int:
    """The file's size when `read_manifest` can read it in byte ranges (one uncompressed,
    non-empty JSONL file), else 0."""
    if manifest_format(uri) != "jsonl" or uri.lower().endswith(".gz"):
        return 0
    fs, path = arrow_filesystem(uri, storage)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File and info.size else 0


def estimated_rows(uri: str, storage: StorageConfig) -> int:
    """About how many rows a manifest that reads in byte ranges has (its size over its first
    MB's bytes per line), to size blocks before a pass has counted them; 0 for any other."""
    size = reads_in_ranges(uri, storage)
    if not size:
        return 0
    return size // _bytes_per_line(*arrow_filesystem(uri, storage))


def byte_ranges(size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    step = max(1, int(chunk_bytes))
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def chunk_spans(chunks, size: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """The byte spans of a set of `byte_ranges(size, chunk_bytes)` indexes, neighbours merged
    (one ranged request per run of chunks on S3)."""
    step = max(1, int(chunk_bytes))
    spans: list[list[int]] = []
    for c in sorted(set(int(c) for c in chunks)):
        start, end = c * step, min((c + 1) * step, size)
        if spans and spans[-1][1] == start:
            spans[-1][1] = end
        else:
            spans.append([start, end])
    return [(a, b) for a, b in spans]


def _bytes_per_line(fs, path: str, sample: int = 1 << 20) -> int:
    with fs.open_input_stream(path) as f:
        head = f.read(sample)
    return max(1, len(head) // max(1, head.count(b"\n")))


def _read_jsonl_chunks(batch, uri: str, storage: StorageConfig, step: int, size: int):
    fs, path = arrow_filesystem(uri, storage)
    lines: list[str] = []
    with fs.open_input_file(path) as f:
        for start, end in chunk_spans(batch["chunk"].to_numpy(), size, step):
            lines += jsonl_lines_in_range(f, start, end)
    return _parse_jsonl_lines(pa.table({"text": pa.array(lines, pa.string())}))


def jsonl_lines_in_range(f, start: int, end: int, read_ahead: int = 1 << 16) -> list[str]:
    """The lines of a seekable file that start in [start, end): a line belongs to the range
    its first byte is in, so consecutive ranges split a file into each line exactly once."""
    first = max(0, start - 1)  # the byte before the range tells whether a line starts at `start`
    f.seek(first)
    buf = f.read(end - first)
    while buf and not buf.endswith(b"\n"):  # finish the line that started before `end`
        more = f.read(read_ahead)
        if not more:
            break
        cut = more.find(b"\n")
        buf += more if cut < 0 else more[: cut + 1]
        if cut >= 0:
            break
    if start > 0:
        cut = buf.find(b"\n")
        buf = b"" if cut < 0 else buf[cut + 1 :]  # the line in progress at `start` is the previous range's
    # Read as the whole-file reader does: lines split on newlines, decoded as UTF-8 (a byte that
    # is not UTF-8 becomes U+FFFD and the line fails to parse as JSON: an error row).
    lines = buf.decode("utf-8", "replace").split("\n")
    return lines[:-1] if buf.endswith(b"\n") else lines


def _parse_jsonl_lines(table):
    rows = []
    for line in table.column("text").to_pylist():
        if not line or not line.strip():
            continue  # blank lines are not rows
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError(f"a manifest line must be a JSON object, got {type(obj).__name__}")
            rows.append({"raw": json.dumps(obj), "parse_error": None})
        except ValueError as exc:
            rows.append({"raw": line[:2000], "parse_error": f"line is not valid JSON ({exc})"})
    return pa.Table.from_pylist(rows, schema=pa.schema([("raw", pa.string()), ("parse_error", pa.string())]))


def normalise_row(row: dict[str, Any], default_recipes: list[str]) -> dict[str, Any]:
    """One validated manifest row, or an error row (`error` set) that names the bad value."""
    raw_error = row.get("parse_error")
    if "raw" in row:
        if raw_error:
            return _bad(row.get("raw", ""), "", raw_error)
        row = json.loads(row["raw"])
    if ROW_ERROR in row:
        return _bad(str(row.get("line", "")), "", str(row[ROW_ERROR]))
    sku = _text(row.get("sku"))
    uri = _text(row.get("image_uri"))
    out = {
        "sku": sku or "",
        "source_uri": uri or "",
        "title": _text(row.get("title")) or "",
        "category": _text(row.get("category")) or "",
        "attributes": "{}",
        "recipes": list(default_recipes),
        "overlay_mask_uri": _text(row.get("overlay_mask_uri")) or "",
        "error": None,
    }
    if not sku:
        return {**out, "error": f"sku is empty or missing (row: {json.dumps(row, default=str)[:200]}); every row needs a sku"}
    if len(sku) > MAX_SKU_LEN:
        return {**out, "sku": sku[:MAX_SKU_LEN], "error": f"sku is {len(sku)} characters, over the limit of {MAX_SKU_LEN}"}
    if not uri:
        return {**out, "error": f"image_uri is empty for sku {sku!r}"}
    if is_s3(uri):
        try:
            split_s3(uri)
        except StorageError:
            return {**out, "error": f"image_uri {uri!r} is not a valid s3://bucket/key URI"}
    elif "://" in uri and not uri.startswith("file://"):
        return {**out, "error": f"image_uri {uri!r}: only s3:// URIs and local paths are supported"}
    attrs = row.get("attributes")
    if isinstance(attrs, str) and not attrs.strip():
        attrs = None  # an empty CSV cell: no attributes
    if isinstance(attrs, str):
        try:
            attrs = json.loads(attrs)
        except ValueError:
            return {**out, "error": f"attributes for sku {sku!r} is not a JSON object: {attrs[:100]!r}"}
    if attrs is not None and not (isinstance(attrs, dict) or _is_missing(attrs)):
        if isinstance(attrs, list) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in attrs):
            attrs = dict(attrs)  # Parquet map columns arrive as key/value pairs
        else:
            return {**out, "error": f"attributes for sku {sku!r} must be a map/JSON object, got {type(attrs).__name__}"}
    out["attributes"] = json.dumps(attrs or {}, sort_keys=True, default=str)
    recipes = row.get("recipes")
    if isinstance(recipes, str):
        recipes = [r.strip() for r in recipes.replace(";", ",").split(",") if r.strip()]
    if recipes is not None and not _is_missing(recipes):
        recipes = list(recipes)
        if recipes:
            unknown = [r for r in recipes if r not in default_recipes]
            if unknown:
                return {**out, "error": f"sku {sku!r} asks for recipes {unknown} that this run does not have ({default_recipes})"}
            out["recipes"] = recipes
    return out


def _bad(raw: str, sku: str, message: str) -> dict[str, Any]:
    return {
        "sku": sku,
        "source_uri": "",
        "title": "",
        "category": "",
        "attributes": "{}",
        "recipes": [],
        "overlay_mask_uri": "",
        "error": f"{message}: {raw[:200]!r}",
    }


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, np.ndarray) and v.size == 0)


def _text(v) -> str | None:
    if _is_missing(v):
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return str(v).strip()
