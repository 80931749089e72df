"""Prior rows as shards of sorted pages: built on the workers through storage, read by point
lookups. (The near-duplicate search pages its flags the same way, keyed by journal group
instead of sku: `write_pages(..., key=)`, `rows_in_shards`; pipelines/duplicates.py.)

Layout under one load's prefix (`OUT/<run>/_prior/aNNNN-<id>/`):

    scatter/shard-NNNNN/<task>.parquet   one scatter task's rows of one shard (gather deletes them)
    shard-NNNNN.pages                    the shard's rows sorted by sku, cut into pages of about
                                         PAGE_ROWS rows that never split a sku; each page is an
                                         Arrow IPC stream in one lz4 frame (`size`: unpacked): it
                                         decodes in ~0.7 ms, where Parquet's 70-odd columns take ~8
    shard-NNNNN.index.json               [[first sku, offset, length, rows, size], ...]: a page each

Why not a Ray shuffle: `groupby(...).map_groups` holds every prior row in the object store
at once, so the store grew linearly with the catalog (~2 KB a row: ~21 GB at 10M rows).
Here a task holds only its own input, and the object store only row counts.

Why pages: a lookup reads the one page that holds its sku (a ranged GET of ~PAGE_ROWS rows)
and a worker keeps the last few pages indexed. Indexing whole shards instead thrashes once a
catalog has more shards than a worker can keep: every row then costs a whole shard's read.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import StorageConfig, delete_objects, exists, join, list_objects, read_bytes, read_range, write_bytes

PAGE_ROWS = 256  # rows per page: what one lookup reads and decodes (~ms)
PARQUET = "application/vnd.apache.parquet"


def pages_uri(prefix: str, shard: int) -> str:
    return join(prefix, f"shard-{shard:05d}.pages")


def index_uri(prefix: str, shard: int) -> str:
    return join(prefix, f"shard-{shard:05d}.index.json")


def _fragments_dir(prefix: str, shard: int) -> str:
    return join(prefix, "scatter", f"shard-{shard:05d}")


# ---------------------------------------------------------------------------- building


def scatter(table: pa.Table, prefix: str, storage: StorageConfig, task: str) -> None:
    """Write `table`'s rows (with an int `shard` column) as one fragment per shard. `task`
    names the fragments, so a retried task overwrites its own instead of adding copies."""
    if not len(table):
        return
    table = table.sort_by("shard")
    shards = table["shard"].to_numpy()
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
    ends = np.r_[starts[1:], len(shards)]
    for start, end in zip(starts.tolist(), ends.tolist()):
        buf = pa.BufferOutputStream()
        pq.write_table(table.slice(start, end - start).drop_columns(["shard"]), buf, compression="zstd")
        write_bytes(join(_fragments_dir(prefix, int(shards[start])), f"{task}.parquet"), buf.getvalue().to_pybytes(), storage, PARQUET)


def read_fragments(prefix: str, shard: int, storage: StorageConfig) -> tuple[list[str], pa.Table | None]:
    """(fragment URIs, their rows together) of one shard; (.., None) when none were scattered."""
    fragments = list_objects(_fragments_dir(prefix, shard), storage)
    if not fragments:
        return [], None
    return fragments, pa.concat_tables([pq.read_table(pa.BufferReader(read_bytes(u, storage))) for u in fragments], promote_options="default")


def gather(shard: int, prefix: str, storage: StorageConfig, page_rows: int = PAGE_ROWS) -> int:
    """Merge a shard's fragments into its sorted pages and index; returns its rows (0: none).

    A retry is safe at any point. The index is written last and the prefix is new for each
    load, so an index here means the pages are whole: a retry of a gather that died while
    deleting its fragments only finishes the delete. (Re-gathering what was left would
    overwrite the shard with part of its rows.)"""
    if exists(index_uri(prefix, shard), storage):
        delete_objects(list_objects(_fragments_dir(prefix, shard), storage), storage)
        return sum(e[3] for e in json.loads(read_bytes(index_uri(prefix, shard), storage)))
    fragments, table = read_fragments(prefix, shard, storage)
    if table is None:  # nothing was scattered to this shard
        return 0
    rows = write_pages(table, prefix, shard, storage, page_rows)
    delete_objects(fragments, storage)
    return rows


def write_pages(table: pa.Table, prefix: str, shard: int, storage: StorageConfig, page_rows: int = PAGE_ROWS, key: str = "sku") -> int:
    """`table` as one shard's pages (sorted by `key`; a key's rows in one page) and index."""
    table = table.set_column(table.schema.get_field_index(key), key, pc.fill_null(table[key], ""))
    table = table.sort_by(key)
    keys = table[key].to_pylist()
    blob = bytearray()
    index = []
    start = 0
    while start < len(keys):
        end = min(start + page_rows, len(keys))
        while end < len(keys) and keys[end] == keys[end - 1]:  # a key's rows stay in one page
            end += 1
        raw = _ipc_bytes(table.slice(start, end - start))
        page = _CODEC.compress(raw, asbytes=True)
        index.append([keys[start], len(blob), len(page), end - start, len(raw)])
        blob += page
        start = end
    write_bytes(pages_uri(prefix, shard), bytes(blob), storage)
    write_bytes(index_uri(prefix, shard), json.dumps(index).encode(), storage, "application/json")
    return len(keys)


_CODEC = pa.Codec("lz4")  # one frame per page: IPC's own per-buffer compression costs ~0.4 ms more per read


def _ipc_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


# ---------------------------------------------------------------------------- looking up

_CACHED_INDEXES = 4096  # a shard's index is ~50 bytes a page
_CACHED_PAGES = 128  # decoded Arrow pages: ~0.3 MB each
_LOOKUP_THREADS = 8
_lock = threading.Lock()
_indexes: OrderedDict[str, _PageIndex] = OrderedDict()
_pages: OrderedDict[tuple[str, int], _Page] = OrderedDict()


def _cache_get(cache: OrderedDict, key):
    with _lock:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
        return value


def _cache_put(cache: OrderedDict, key, value, limit: int) -> None:
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (a lookup's dict key)
class _PageIndex:
    """One shard's page index (shard-NNNNN.index.json)."""

    uri: str  # the shard's .pages object
    entries: list[list]  # [first sku, offset, length, rows, unpacked size] per page

    def page_of(self, sku: str) -> int:
        """The page whose sku range holds `sku` (pages never split a sku); -1 before the first."""
        return bisect.bisect_right(self.firsts, sku) - 1

    @functools.cached_property
    def firsts(self) -> list[str]:
        return [e[0] for e in self.entries]


def _load_index(prefix: str, shard: int, storage: StorageConfig) -> _PageIndex:
    value = _PageIndex(pages_uri(prefix, shard), json.loads(read_bytes(index_uri(prefix, shard), storage)))
    _cache_put(_indexes, value.uri, value, _CACHED_INDEXES)
    return value


class _Page:
    """One decoded page: its rows in Arrow (sorted by `key`); only the rows asked for become dicts."""

    def __init__(self, data: bytes, raw_size: int, key: str):
        self.table = pa.ipc.open_stream(_CODEC.decompress(data, decompressed_size=raw_size)).read_all()
        self.keys = self.table[key].to_pylist()

    def slice(self, value: str) -> pa.Table:
        lo = bisect.bisect_left(self.keys, value)
        hi = bisect.bisect_right(self.keys, value, lo)
        return self.table.slice(lo, hi - lo)

    def rows(self, value: str) -> list[dict[str, Any]]:
        found = self.slice(value)
        return found.to_pylist() if len(found) else []


def _load_page(index: _PageIndex, page: int, storage: StorageConfig, key: str) -> _Page:
    _, offset, length, _, raw_size = index.entries[page]
    value = _Page(read_range(index.uri, storage, offset, length), raw_size, key)
    _cache_put(_pages, (index.uri, page), value, _CACHED_PAGES)
    return value


def lookup(prefix: str, storage: StorageConfig, shard_skus: dict[int, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """{sku: its rows} for the skus of each shard, reading (concurrently) only the shard
    indexes and pages not already cached on this worker."""
    wanted, pages = _pages_for(prefix, storage, shard_skus, "sku")
    return {sku: pages[k].rows(sku) for k, skus in wanted.items() for sku in skus}


def rows_in_shards(prefix: str, storage: StorageConfig, shards: list[int], value: str, key: str) -> list[pa.Table]:
    """The rows whose `key` is `value`, from each of `shards`, as Arrow tables. The shards'
    pages were written by write_pages with that key and `page_rows=1` (a page per key value),
    so the index alone tells which shards hold the value: only their pages are read."""
    wanted, pages = _pages_for(prefix, storage, {s: [value] for s in shards}, key, exact=True)
    return [t for k in wanted if len(t := pages[k].slice(value))]


def _pages_for(prefix: str, storage: StorageConfig, shard_keys: dict[int, list[str]], key: str, exact: bool = False):
    """({(shard index, page): the keys wanted from it}, {(shard index, page): the page}).
    `exact`: only pages that start with a wanted key (pages of one key value each)."""
    # 1. Each shard's page index.
    indexes = {s: _cache_get(_indexes, pages_uri(prefix, s)) for s in shard_keys}
    missing = [s for s, v in indexes.items() if v is None]
    with ThreadPoolExecutor(max_workers=max(1, min(_LOOKUP_THREADS, len(shard_keys)))) as pool:
        for s, value in zip(missing, pool.map(lambda s: _load_index(prefix, s, storage), missing)):
            indexes[s] = value
        # 2. The page each key falls in, read unless cached.
        wanted: dict[tuple[_PageIndex, int], list[str]] = {}
        for s, values in shard_keys.items():
            for v in values:
                page = indexes[s].page_of(v)
                if page >= 0 and (not exact or indexes[s].entries[page][0] == v):
                    wanted.setdefault((indexes[s], page), []).append(v)
        pages = {k: _cache_get(_pages, (k[0].uri, k[1])) for k in wanted}
        missing_pages = [k for k, v in pages.items() if v is None]
        for k, value in zip(missing_pages, pool.map(lambda k: _load_page(*k, storage, key), missing_pages)):
            pages[k] = value
    return wanted, pages


def clear_cache() -> None:
    with _lock:
        _indexes.clear()
        _pages.clear()
