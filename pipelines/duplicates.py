"""Perceptual-hash near-duplicates, flagged as columns at commit:

- `duplicate_of_variant`: among one SKU's variants of a recipe, a variant whose image is within
  `VARIANT_DISTANCE` bits of a lower-numbered variant names it (a wasted slot: e.g. a
  deterministic recipe asked for several variants, or a generator that collapsed);
- `shared_source_skus`: other SKUs whose source photo is within `SOURCE_DISTANCE` bits of this
  one's (one photo listed for several products is usually a catalog mistake), at most
  SHARED_LIST_MAX of them.

Hashes are 64-bit DCT hashes (`ops.scores.phash`). Catalog-wide pairs are found by banding:
two hashes within 3 bits agree exactly on at least one of four 16-bit bands, so only SKUs
sharing a band value are compared. Works on the metadata rows (no pixels) on the workers;
only flagged rows end up in the lookup tables shipped back to the workers.
"""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from ops.scores import phash_distance

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


BUCKETS = 256  # groups of the distributed passes: each sees ~1/256 of the hashes


# Up to this many rows the hashes are searched on the driver (as Python rows, ~1.8 KB each:
# ~36 MB at the bound); above it on workers, which costs two shuffles' start-up.
LOCAL_ROWS = 20_000


def flag_duplicates(rows, n_variants: int | None = None):
    """The run's rows with `duplicate_of_variant` and `shared_source_skus` filled in.
    `n_variants`: how many variant rows there are, when the caller counted them (0: the rows
    are returned as they are, their flags null; Ray's shuffle fails on a dataset with no rows).

    Above LOCAL_ROWS variant rows (or when uncounted) both searches run on the workers, grouped so that every pair they
    must compare meets in one group: a SKU's variants by the SKU's bucket, source hashes by
    their band values' buckets (two hashes within SOURCE_DISTANCE share a band value). Their
    flags stay on the workers as Arrow blocks in the object store; the driver holds only the
    blocks' references, and each flagging worker reads them once (a catalog of look-alike
    colour variants flags most of its SKUs: as Python dicts on the driver that was ~0.8 KB a
    SKU, shipped to every task; bench/catalog_phases.py). Below it, the hash columns (a few
    MB) come to the driver instead: the same search without two shuffles' start-up cost."""
    if n_variants == 0:
        return rows
    hashes = rows.map_batches(_variant_hashes, batch_format="pyarrow")
    if n_variants is None or n_variants > LOCAL_ROWS:
        repeats = hashes.map_batches(_by_sku_bucket, batch_format="pyarrow").groupby("bucket").map_groups(_repeats_in_group, batch_format="pyarrow").materialize()
        shared = hashes.map_batches(_by_band_bucket, batch_format="pyarrow").groupby("bucket").map_groups(_shared_in_group, batch_format="pyarrow").materialize()
        log.info("near-duplicates: %d repeated variants, %d (sku, other sku) pairs sharing a source photo", repeats.count(), shared.count())
        flags = {"repeats": repeats.to_arrow_refs(), "shared": shared.to_arrow_refs()}
        return rows.map_batches(_flag_from_blocks, fn_kwargs=flags, batch_format="pyarrow", batch_size=None)
    meta = [r for b in hashes.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    repeats_found = variant_repeats(meta)
    shared_found: dict[str, set[str]] = defaultdict(set)
    for sku, others in shared_sources({(r["sku"], r["source_phash"]) for r in meta}).items():
        shared_found[sku].update(others)
    if repeats_found or shared_found:
        log.info("near-duplicates: %d repeated variants, %d skus sharing a source photo", len(repeats_found), len(shared_found))
    return rows.map_batches(_Flag(repeats_found, {k: sorted(v)[:SHARED_LIST_MAX] for k, v in shared_found.items()}), batch_format="pyarrow", batch_size=None)


def _variant_hashes(table: pa.Table) -> pa.Table:
    t = table.filter(pc.fill_null(pc.equal(table["kind"], "variant"), False))
    return t.select(["sku", "recipe", "variant", "attempt", "phash", "source_phash"])


def _bucket(keys) -> pa.Array:
    return pa.array([zlib.crc32(k.encode("utf-8", "surrogatepass")) % BUCKETS for k in keys], pa.int32())


def _by_sku_bucket(table: pa.Table) -> pa.Table:
    return table.append_column("bucket", _bucket(pc.fill_null(table["sku"], "").to_pylist()))


def _by_band_bucket(table: pa.Table) -> pa.Table:
    """One row per (band, distinct sku/source hash pair), keyed by the band value's bucket."""
    pairs = sorted({(s, h) for s, h in zip(table["sku"].to_pylist(), table["source_phash"].to_pylist()) if s and h})
    skus, hashes, buckets = [], [], []
    for s, h in pairs:
        for b in range(4):
            skus.append(s)
            hashes.append(h)
            buckets.append(f"{b}:{h[4 * b : 4 * b + 4]}")
    return pa.table({"sku": pa.array(skus, pa.string()), "source_phash": pa.array(hashes, pa.string()), "bucket": _bucket(buckets)})


def _repeats_in_group(table: pa.Table) -> pa.Table:
    found = variant_repeats(table.to_pylist())
    return pa.table({
        "sku": pa.array([k[0] for k in found], pa.string()), "recipe": pa.array([k[1] for k in found], pa.string()),
        "variant": pa.array([k[2] for k in found], pa.int64()), "of": pa.array(list(found.values()), pa.int64()),
    })  # fmt: skip


def _shared_in_group(table: pa.Table) -> pa.Table:
    found = shared_sources(set(zip(table["sku"].to_pylist(), table["source_phash"].to_pylist())))
    pairs = [(sku, other) for sku, others in found.items() for other in others[:SHARED_LIST_MAX]]
    return pa.table({"sku": pa.array([a for a, _ in pairs], pa.string()), "other": pa.array([b for _, b in pairs], pa.string())})


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


# Per worker process: the flag tables behind the block references, read once.
_FLAG_TABLES: dict[tuple, tuple[pa.Table, pa.Table]] = {}


def _flag_tables(repeats: list, shared: list) -> tuple[pa.Table, pa.Table]:
    """(key -> lower variant, sku -> sorted other skus) from the searches' blocks."""
    import ray

    cache_key = tuple(r.hex() for r in repeats) + ("|",) + tuple(r.hex() for r in shared)
    if cache_key not in _FLAG_TABLES:
        _FLAG_TABLES.clear()  # another run's flags: not needed again
        rep = pa.concat_tables(ray.get(repeats)) if repeats else None
        rep = pa.table({"key": _variant_key(rep), "of": pc.cast(rep["of"], pa.int32())}) if rep is not None and len(rep) else pa.table({"key": pa.array([], pa.string()), "of": pa.array([], pa.int32())})
        pairs = pa.concat_tables(ray.get(shared)) if shared else None
        if pairs is not None and len(pairs):
            # The driver path's sorted(set(...))[:SHARED_LIST_MAX], in Arrow: unique pairs in
            # (sku, other) order, listed per sku in that order, then cut.
            pairs = pairs.group_by(["sku", "other"]).aggregate([]).sort_by([("sku", "ascending"), ("other", "ascending")])
            lists = pairs.group_by("sku", use_threads=False).aggregate([("other", "list")])
            share = pa.table({"sku": lists["sku"], "others": pc.list_slice(lists["other_list"], 0, SHARED_LIST_MAX)})
        else:
            share = pa.table({"sku": pa.array([], pa.string()), "others": pa.array([], pa.list_(pa.string()))})
        _FLAG_TABLES[cache_key] = (rep.combine_chunks(), share.combine_chunks())
    return _FLAG_TABLES[cache_key]


def _variant_key(t: pa.Table):
    return pc.binary_join_element_wise(t["sku"], t["recipe"], pc.cast(t["variant"], pa.string()), "\x00")


def _flag_from_blocks(table: pa.Table, repeats: list, shared: list) -> pa.Table:
    rep, share = _flag_tables(repeats, shared)
    is_variant = pc.fill_null(pc.equal(table["kind"], "variant"), False)
    dup = rep["of"].take(pc.index_in(_variant_key(table), value_set=rep["key"]))
    others = share["others"].take(pc.index_in(table["sku"], value_set=share["sku"]))
    # Variants without a flag get an empty list (as on the driver path); other rows null.
    empty = pa.scalar([], pa.list_(pa.string()))
    others = pc.if_else(is_variant, pc.fill_null(others, empty) if len(others) else others, pa.nulls(len(table), pa.list_(pa.string())))
    dup = pc.if_else(is_variant, dup, pa.nulls(len(table), pa.int32()))
    return _with_flags(table, dup.combine_chunks() if isinstance(dup, pa.ChunkedArray) else dup,
                       others.combine_chunks() if isinstance(others, pa.ChunkedArray) else others)  # fmt: skip
