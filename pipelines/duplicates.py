"""Perceptual-hash near-duplicates, flagged as columns at commit:

- `duplicate_of_variant`: among one SKU's variants of a recipe, a variant whose image is within
  `VARIANT_DISTANCE` bits of a lower-numbered variant names it (a wasted slot: e.g. a
  deterministic recipe asked for several variants, or a generator that collapsed);
- `shared_source_skus`: other SKUs whose source photo is within `SOURCE_DISTANCE` bits of this
  one's (one photo listed for several products is usually a catalog mistake), at most
  SHARED_LIST_MAX of them.

Hashes are 64-bit DCT hashes (`ops.scores.phash`). Catalog-wide pairs are found by banding:
two hashes within 3 bits agree exactly on at least one of four 16-bit bands, so only SKUs
sharing a band value are compared.

Small runs search on the driver. Large ones search on the workers through storage, under
`OUT/<run>/_duplicates/aNNNN-<id>/` (deleted on commit, like the journal):

    variants/scatter/shard-NNNNN/<task>.parquet  hash rows (with their journal group), by SKU shard
    bands/scatter/shard-NNNNN/<task>.parquet     (sku, source hash, group) once per band value,
                                                 by the band value's shard
    flags/shard-NNNNN.pages + .index.json        what search shard NNNNN found, as one page per
                                                 journal group it applies to (pipelines/prior_index.py)

1. scatter tasks of ~SCATTER_ROWS journal rows write their hash rows by shard;
2. one task per shard searches it and pages its flags by the journal group they apply to;
3. the commit's fused task reads the shard indexes (once per worker) and the pages of its own
   group: one ranged read per shard that flagged one of its rows.

Why not a Ray shuffle: `groupby(...).map_groups` holds every hash row, and its results, in the
object store (15.4 MB at 100k SKUs, ~2 GB at 10M). Here only counts pass through it. The
files written are 2 x scatter tasks x shards fragments plus two per shard: ~700 at 1M rows,
~60k at 10M (as the prior state's scatter).
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from ops.scores import phash_distance
from pipelines import prior_index
from pipelines.state import SCATTER_ROWS, Journal, journal_blocks, journal_file_rows, read_journal_group, shard_of, with_shards
from pipelines.storage import StorageConfig, delete_objects, join, list_objects

log = logging.getLogger(__name__)

VARIANT_DISTANCE = 4
# At most this many other SKUs named per SKU in `shared_source_skus` (the lowest by name): one
# photo listed under thousands of SKUs would otherwise make the flag lists, and the driver,
# grow with the square of that count. The flag is the signal; the list is a sample.
SHARED_LIST_MAX = 20
SOURCE_DISTANCE = 3  # must stay < 4 for the 4-band candidate search to be exact


def variant_repeats(rows: list[dict], distance: int = VARIANT_DISTANCE) -> dict[tuple[str, str, int], int]:
    """{(sku, recipe, variant): the lower variant it repeats} from rows with sku, recipe,
    variant, phash and (optionally) attempt; each variant is judged by its last gate attempt."""
    final: dict[tuple[str, str, int], tuple[int, str]] = {}
    for r in rows:
        key, attempt = (r["sku"], r["recipe"], int(r["variant"])), int(r.get("attempt") or 1)
        if r["phash"] and (key not in final or attempt > final[key][0]):
            final[key] = (attempt, r["phash"])
    groups: dict[tuple[str, str], list[tuple[int, str]]] = defaultdict(list)
    for (sku, recipe, v), (_, h) in final.items():
        groups[(sku, recipe)].append((v, h))
    out = {}
    for (sku, recipe), items in groups.items():
        items.sort()
        for i, (v, h) in enumerate(items):
            for w, g in items[:i]:
                if phash_distance(h, g) <= distance:
                    out[(sku, recipe, v)] = w
                    break
    return out


def shared_sources(pairs: set[tuple[str, str]], distance: int = SOURCE_DISTANCE) -> dict[str, list[str]]:
    """{sku: other skus with a near-identical source photo} from (sku, source phash) pairs."""
    bands: dict[tuple[int, str], set[str]] = defaultdict(set)
    hashes: dict[str, set[str]] = defaultdict(set)
    for sku, h in pairs:
        if h:
            hashes[sku].add(h)
            for b in range(4):
                bands[(b, h[4 * b : 4 * b + 4])].add(sku)
    out: dict[str, set[str]] = defaultdict(set)
    for skus in bands.values():
        if len(skus) < 2:
            continue
        ordered = sorted(skus)
        for i, a in enumerate(ordered):
            for b in ordered[i + 1 :]:
                if b in out[a]:
                    continue
                if any(phash_distance(x, y) <= distance for x in hashes[a] for y in hashes[b]):
                    out[a].add(b)
                    out[b].add(a)
    return {sku: sorted(others) for sku, others in out.items() if others}


DUPLICATES = "_duplicates"  # this attempt's search files under the run prefix (deleted on commit)

# Up to this many variant rows the hashes are searched on the driver (as Python rows, ~1.8 KB
# each: ~36 MB at the bound); above it on workers, through storage.
LOCAL_ROWS = 20_000
# Journal rows per search shard: one task's search, as Python rows (~100 MB at the bound).
SEARCH_ROWS = 50_000


def flag_duplicates(journal: Journal, n_variants: int | None = None):
    """The journal's rows, as a lazy Dataset, with `duplicate_of_variant` and
    `shared_source_skus` filled in. `n_variants`: how many variant rows there are, when the
    caller counted them (0: the rows as they are, their flags null).

    Up to LOCAL_ROWS variant rows the hash columns (a few MB) come to the driver and the
    flags go to the workers with the flagging function. Above it (or uncounted) the search
    runs on the workers through storage (module docstring): a catalog of look-alike colour
    variants flags most of its SKUs, and neither the driver nor the object store may hold
    that."""
    if n_variants == 0:
        return journal.rows()
    if n_variants is None or n_variants > LOCAL_ROWS:
        return _flag_through_storage(journal)
    rows = journal.rows()
    hashes = rows.map_batches(_variant_hashes, batch_format="pyarrow")
    meta = [r for b in hashes.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    repeats_found = variant_repeats(meta)
    shared_found = shared_sources({(r["sku"], r["source_phash"]) for r in meta})
    if repeats_found or shared_found:
        log.info("near-duplicates: %d repeated variants, %d skus sharing a source photo", len(repeats_found), len(shared_found))
    return rows.map_batches(_Flag(repeats_found, {k: v[:SHARED_LIST_MAX] for k, v in shared_found.items()}), batch_format="pyarrow", batch_size=None)


_HASH_COLUMNS = ["sku", "recipe", "variant", "attempt", "phash", "source_phash"]


def _variant_hashes(table: pa.Table) -> pa.Table:
    t = table.filter(pc.fill_null(pc.equal(table["kind"], "variant"), False))
    return t.select(_HASH_COLUMNS)


def _hash_schema() -> pa.Schema:
    """The journal columns the search reads (of ~70)."""
    from pipelines.schema import OUTPUT_SCHEMA

    return pa.schema([OUTPUT_SCHEMA.field(n) for n in ["kind", *_HASH_COLUMNS]])


# ---------------------------------------------------------------------------- through storage


def _flag_through_storage(journal: Journal):
    import ray

    groups = journal.groups()  # once: the scatter and the commit must see the same blocks
    if not groups:
        return journal.rows()
    storage = journal.storage
    stale = list_objects(join(journal.run_prefix, DUPLICATES), storage)
    if stale:  # an interrupted attempt's search files
        delete_objects(stale, storage)
    # Unique per search: a retried commit task must never read another search's flags.
    prefix = join(journal.run_prefix, DUPLICATES, f"a{journal.attempt:04d}-{uuid.uuid4().hex[:12]}")
    rows = sum(journal_file_rows(u) for g in groups for u in g)
    shards = max(1, math.ceil(rows / SEARCH_ROWS))
    blocks = journal_blocks(groups)

    # 1. Scatter: hash rows by SKU shard, (sku, source hash, group) by band value's shard. A task
    #    reads ~SCATTER_ROWS rows (several groups): tasks x shards fragments are written.
    per_task = max(1, round(SCATTER_ROWS * len(groups) / max(rows, 1)))
    scatter = blocks.map_batches(_scatter_hashes, fn_kwargs={"storage": storage, "prefix": prefix, "shards": shards}, batch_format="pyarrow", batch_size=per_task)
    hashed = sum(int(b["rows"].sum()) for b in scatter.iter_batches(batch_size=None, batch_format="numpy"))
    # 2. Search each shard; its flags become pages keyed by the journal group they apply to.
    search = ray.data.range(shards, override_num_blocks=min(shards, 64))
    search = search.map_batches(_search_shards, fn_kwargs={"storage": storage, "prefix": prefix}, batch_format="pyarrow", batch_size=1)
    repeated = pairs = 0
    flagged: list[int] = []
    for b in search.iter_batches(batch_size=None, batch_format="numpy"):
        repeated, pairs = repeated + int(b["repeated"].sum()), pairs + int(b["pairs"].sum())
        flagged += [int(s) for s, n in zip(b["shard"], b["flag_rows"]) if n]
    log.info("near-duplicates: %d variant rows searched in %d shards; %d repeated variants, %d (sku, other sku) pairs sharing a source photo "
             "(a pair sharing two band values counts in both shards)", hashed, shards, repeated, pairs)  # fmt: skip
    # 3. The rows, each group flagged from its pages in the task that reads it.
    return blocks.map_batches(_read_journal_and_flag, fn_kwargs={"storage": storage, "prefix": prefix, "shards": sorted(flagged)}, batch_format="pyarrow", batch_size=None)


def _group_key(uris: list[str]) -> str:
    """A journal group's name in the search files (a file belongs to one group)."""
    return hashlib.sha256(uris[0].encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _scatter_hashes(batch: pa.Table, storage: StorageConfig, prefix: str, shards: int) -> pa.Table:
    groups = batch["uris"].to_pylist()
    tables = []
    for uris in groups:
        t = _variant_hashes(read_journal_group(uris, storage, _hash_schema()))
        tables.append(t.append_column("group", pa.array([_group_key(uris)] * len(t), pa.string())))
    hashes = pa.concat_tables(tables)
    task = _group_key(groups[0])  # names the fragments: a retried task overwrites its own
    prior_index.scatter(with_shards(hashes, shards), join(prefix, "variants"), storage, task)
    triples = sorted({t for t in zip(hashes["sku"].to_pylist(), hashes["source_phash"].to_pylist(), hashes["group"].to_pylist()) if t[0] and t[1]})
    bands = [(s, h, g, f"{b}:{h[4 * b : 4 * b + 4]}") for s, h, g in triples for b in range(4)]
    if bands:
        table = pa.table({
            "sku": pa.array([s for s, *_ in bands], pa.string()), "source_phash": pa.array([h for _, h, *_ in bands], pa.string()),
            "group": pa.array([g for *_, g, _ in bands], pa.string()), "shard": pa.array([shard_of(v, shards) for *_, v in bands], pa.int32()),
        })  # fmt: skip
        prior_index.scatter(table, join(prefix, "bands"), storage, task)
    return pa.table({"rows": pa.array([len(hashes)], pa.int64())})


_FLAG_SCHEMA = pa.schema([("group", pa.string()), ("sku", pa.string()), ("recipe", pa.string()), ("variant", pa.int64()), ("of", pa.int64()), ("other", pa.string())])


def _search_shards(batch: pa.Table, storage: StorageConfig, prefix: str) -> pa.Table:
    out = {"shard": [], "repeated": [], "pairs": [], "flag_rows": []}
    for shard in batch["id"].to_pylist():
        flags: list[dict] = []
        repeated = pairs = 0
        # 1. Repeated variants: a SKU's rows (every attempt, every group) are all in its shard.
        _, table = prior_index.read_fragments(join(prefix, "variants"), int(shard), storage)
        if table is not None:
            rows = table.to_pylist()
            groups: dict[tuple, set[str]] = defaultdict(set)
            for r in rows:
                groups[(r["sku"], r["recipe"], int(r["variant"]))].add(r["group"])
            found = variant_repeats(rows)
            flags += [{"group": g, "sku": k[0], "recipe": k[1], "variant": k[2], "of": of} for k, of in found.items() for g in groups[k]]
            repeated = len(found)
        # 2. Shared source photos: every group holding a SKU's hash is where that hash's bands went.
        #    (The flag reaches the rows whose source hash matched; the driver path flags all of
        #    the SKU's rows. They agree: a run keeps one manifest row, so one source, per SKU.)
        _, table = prior_index.read_fragments(join(prefix, "bands"), int(shard), storage)
        if table is not None:
            sku_groups: dict[str, set[str]] = defaultdict(set)
            for s, g in zip(table["sku"].to_pylist(), table["group"].to_pylist()):
                sku_groups[s].add(g)
            found_pairs = shared_sources(set(zip(table["sku"].to_pylist(), table["source_phash"].to_pylist())))
            for sku, others in found_pairs.items():
                flags += [{"group": g, "sku": sku, "other": o} for g in sku_groups[sku] for o in others[:SHARED_LIST_MAX]]
                pairs += min(len(others), SHARED_LIST_MAX)
        # 3. The shard's flags as pages of one group each (one file and its index per shard).
        if flags:
            prior_index.write_pages(pa.Table.from_pylist(flags, schema=_FLAG_SCHEMA), join(prefix, "flags"), int(shard), storage, page_rows=1, key="group")
        for k, v in (("shard", shard), ("repeated", repeated), ("pairs", pairs), ("flag_rows", len(flags))):
            out[k].append(v)
    return pa.table({k: pa.array(v, pa.int64()) for k, v in out.items()})


def _read_journal_and_flag(batch: pa.Table, storage: StorageConfig, prefix: str, shards: list[int]) -> pa.Table:
    """Each group's journal rows, flagged from the pages written for that group (the shard
    indexes say which shards hold one: only those pages are read)."""
    from pipelines.schema import OUTPUT_SCHEMA

    out = []
    for uris in batch["uris"].to_pylist():
        table = read_journal_group(uris, storage)
        found = prior_index.rows_in_shards(join(prefix, "flags"), storage, shards, _group_key(uris), key="group")
        out.append(_with_flag_table(table, pa.concat_tables(found) if found else _FLAG_SCHEMA.empty_table()))
    return pa.concat_tables(out) if out else OUTPUT_SCHEMA.empty_table()


class _Flag:
    def __init__(self, repeats: dict, shared: dict):
        self.repeats = repeats
        self.shared = shared

    def __call__(self, table: pa.Table) -> pa.Table:
        keys = zip(*(table[c].to_pylist() for c in ("kind", "sku", "recipe", "variant")))
        dup, share = [], []
        for kind, sku, recipe, variant in keys:
            is_variant = kind == "variant"
            dup.append(self.repeats.get((sku, recipe, variant)) if is_variant else None)
            share.append(self.shared.get(sku, []) if is_variant else None)
        return _with_flags(table, pa.array(dup, pa.int32()), pa.array(share, pa.list_(pa.string())))


def _with_flags(table: pa.Table, dup: pa.Array, share: pa.Array) -> pa.Table:
    i = table.schema.get_field_index("duplicate_of_variant")
    table = table.set_column(i, "duplicate_of_variant", dup)
    j = table.schema.get_field_index("shared_source_skus")
    return table.set_column(j, "shared_source_skus", share)


def _with_flag_table(table: pa.Table, flags: pa.Table) -> pa.Table:
    """`table` flagged from flag rows (_FLAG_SCHEMA): a repeat where `of` is set, a pair where
    `other` is. The driver path's sorted(set(...))[:SHARED_LIST_MAX], in Arrow."""
    rep = flags.filter(pc.is_valid(flags["of"]))
    rep = pa.table({"key": _variant_key(rep), "of": pc.cast(rep["of"], pa.int32())})
    pairs = flags.filter(pc.is_valid(flags["other"])).select(["sku", "other"])
    # Unique pairs in (sku, other) order (a pair may come from two shards), listed per sku, cut.
    pairs = pairs.group_by(["sku", "other"]).aggregate([]).sort_by([("sku", "ascending"), ("other", "ascending")])
    lists = pairs.group_by("sku", use_threads=False).aggregate([("other", "list")])
    share = pa.table({"sku": lists["sku"], "others": pc.list_slice(lists["other_list"], 0, SHARED_LIST_MAX)})
    is_variant = pc.fill_null(pc.equal(table["kind"], "variant"), False)
    dup = rep["of"].take(pc.index_in(_variant_key(table), value_set=rep["key"]))
    others = share["others"].take(pc.index_in(table["sku"], value_set=share["sku"]))
    # Variants without a flag get an empty list (as on the driver path); other rows null.
    empty = pa.scalar([], pa.list_(pa.string()))
    others = pc.if_else(is_variant, pc.fill_null(others, empty) if len(others) else others, pa.nulls(len(table), pa.list_(pa.string())))
    dup = pc.if_else(is_variant, dup, pa.nulls(len(table), pa.int32()))
    return _with_flags(table, dup.combine_chunks() if isinstance(dup, pa.ChunkedArray) else dup,
                       others.combine_chunks() if isinstance(others, pa.ChunkedArray) else others)  # fmt: skip


def _variant_key(t: pa.Table):
    return pc.binary_join_element_wise(t["sku"], t["recipe"], pc.cast(t["variant"], pa.string()), "\x00")
