"""Perceptual-hash near-duplicates, flagged as columns at commit:

- `duplicate_of_variant`: among one SKU's variants of a recipe, a variant whose image is within
  `VARIANT_DISTANCE` bits of a lower-numbered variant names it (a wasted slot: e.g. a
  deterministic recipe asked for several variants, or a generator that collapsed);
- `shared_source_skus`: other SKUs whose source photo is within `SOURCE_DISTANCE` bits of this
  one's (one photo listed for several products is usually a catalog mistake).

Hashes are 64-bit DCT hashes (`ops.scores.phash`). Catalog-wide pairs are found by banding:
two hashes within 3 bits agree exactly on at least one of four 16-bit bands, so only SKUs
sharing a band value are compared. Works on the metadata rows (no pixels) on the driver;
only flagged rows end up in the lookup tables shipped back to the workers.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

from ops.scores import phash_distance

log = logging.getLogger(__name__)

VARIANT_DISTANCE = 4
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


def flag_duplicates(rows):
    """The run's rows with `duplicate_of_variant` and `shared_source_skus` filled in."""
    meta = []
    for batch in rows.select_columns(["kind", "sku", "recipe", "variant", "attempt", "phash", "source_phash"]).iter_batches(batch_format="pyarrow"):
        meta.extend(batch.filter(pc.equal(batch["kind"], "variant")).to_pylist())
    repeats = variant_repeats(meta)
    shared = shared_sources({(r["sku"], r["source_phash"]) for r in meta})
    if repeats or shared:
        log.info("near-duplicates: %d repeated variants, %d skus sharing a source photo", len(repeats), len(shared))
    return rows.map_batches(_Flag(repeats, shared), batch_format="pyarrow")


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
        i = table.schema.get_field_index("duplicate_of_variant")
        table = table.set_column(i, "duplicate_of_variant", pa.array(dup, pa.int32()))
        j = table.schema.get_field_index("shared_source_skus")
        return table.set_column(j, "shared_source_skus", pa.array(share, pa.list_(pa.string())))
