"""Near-duplicate flags from real perceptual hashes: a re-encoded copy of a photo is found,
different products are not, and a SKU's repeated variants name the variant they repeat."""

from __future__ import annotations

import io
import itertools

import cv2
import numpy as np
import pytest
from PIL import Image

from ops.scores import phash, phash_distance
from pipelines.duplicates import SOURCE_DISTANCE, shared_sources, variant_repeats
from pipelines.sample_catalog import render_product


def _hash(arr: np.ndarray) -> str:
    return phash(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY))


def _reencoded(arr: np.ndarray, quality: int, scale: float = 1.0) -> np.ndarray:
    img = Image.fromarray(arr)
    if scale != 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_the_same_photo_reencoded_and_resized_is_found_across_skus():
    photos = [render_product(600 + i, size=(640, 640)).photo for i in range(8)]
    pairs = {(f"SKU-{i}", _hash(p)) for i, p in enumerate(photos)}
    copy = _reencoded(photos[3], quality=70, scale=0.75)
    assert phash_distance(_hash(copy), _hash(photos[3])) <= SOURCE_DISTANCE
    pairs.add(("SKU-COPY", _hash(copy)))
    found = shared_sources(pairs)
    assert found == {"SKU-3": ["SKU-COPY"], "SKU-COPY": ["SKU-3"]}
    # And distinct products are far apart (so the flag is not noise).
    hashes = [_hash(p) for p in photos]
    assert min(phash_distance(a, b) for a, b in itertools.combinations(hashes, 2)) > 2 * SOURCE_DISTANCE


def test_repeated_variants_point_at_the_first():
    a, b = (render_product(610 + i, size=(512, 512)).photo for i in range(2))
    rows = [
        {"sku": "S", "recipe": "r", "variant": 0, "phash": _hash(a)},
        {"sku": "S", "recipe": "r", "variant": 1, "phash": _hash(b)},
        {"sku": "S", "recipe": "r", "variant": 2, "phash": _hash(_reencoded(a, 80))},
        {"sku": "T", "recipe": "r", "variant": 0, "phash": _hash(a)},  # another SKU: not a repeat
    ]
    assert variant_repeats(rows) == {("S", "r", 2): 0}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_search_through_storage_flags_exactly_what_the_driver_search_does(ray_session, tmp_path, monkeypatch, request, where):
    """Large catalogs search on the workers through storage (sharded by SKU and by band value,
    flags written to the journal group they apply to), small ones on the driver: both must
    flag the same rows. Real hashes: re-encoded copies shared across SKUs, a SKU whose two
    variants repeat, distinct products, and a retried variant whose attempts sit in different
    journal groups (its last attempt decides; every attempt's row gets the flag)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import duplicates
    from pipelines.duplicates import DUPLICATES, flag_duplicates
    from pipelines.schema import OUTPUT_SCHEMA
    from pipelines.state import Journal, attempt_dir, journal_file_name
    from pipelines.storage import StorageConfig, join, list_objects, write_bytes

    photos = [render_product(i, size=(160, 160)).photo for i in range(6)]
    rows = []
    for i in range(30):
        src = _hash(_reencoded(photos[i % 6], 70 + i % 20)) if i < 12 else _hash(render_product(100 + i, size=(160, 160)).photo)
        for v in range(2):
            ph = _hash(photos[i % 6]) if i % 5 == 0 else _hash(render_product(200 + 2 * i + v, size=(160, 160)).photo)
            rows.append({"kind": "variant", "sku": f"S{i:02d}", "recipe": "r", "variant": v, "attempt": 1, "phash": ph, "source_phash": src})
    # S07's variant 1 failed its gate and was retried: attempt 1 looked new, attempt 2 repeats
    # variant 0. The retry's row comes last, in another journal group.
    retried = next(r for r in rows if r["sku"] == "S07" and r["variant"] == 1)
    rows.append({**retried, "attempt": 2, "phash": next(r["phash"] for r in rows if r["sku"] == "S07" and r["variant"] == 0)})
    rows.insert(20, {"kind": "error", "sku": "BAD", "recipe": None, "variant": None})
    if where == "s3":
        run_prefix, storage = f"s3://{request.getfixturevalue('bucket')}/run", StorageConfig(endpoint_url=request.getfixturevalue("s3_endpoint"), region="us-east-1")
    else:
        run_prefix, storage = str(tmp_path / "run"), StorageConfig()
    for k in range(0, len(rows), 8):  # 8 journal files, 2 a group
        batch = rows[k : k + 8]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(batch, schema=OUTPUT_SCHEMA), buf)
        write_bytes(join(attempt_dir(run_prefix, 1), journal_file_name(f"{k:032x}", len(batch))), buf.getvalue(), storage)
    journal = Journal(run_prefix, 1, storage, rows_per_block=16)
    monkeypatch.setattr(duplicates, "SEARCH_ROWS", 16)  # 4 search shards
    monkeypatch.setattr(duplicates, "SCATTER_ROWS", 24)  # scatter tasks of 2 groups

    def flags(n_rows):
        out = flag_duplicates(journal, n_variants=n_rows).take_all()
        assert len(out) == len(rows)
        return sorted((r["sku"], r["variant"], r["attempt"], r["duplicate_of_variant"], tuple(r["shared_source_skus"] or ())) for r in out if r["kind"] == "variant")

    local, distributed = flags(len(rows)), flags(None)
    assert local == distributed
    assert any(d is not None for *_, d, _ in local) and any(s for *_, s in local)  # both kinds were found
    assert [d for sku, v, _, d, _ in local if (sku, v) == ("S07", 1)] == [0, 0]  # both attempts' rows
    # The search's files are under the run's _duplicates prefix: one search's, then deleted on commit.
    root = join(run_prefix, DUPLICATES)
    written = [u[len(root) + 1 :].split("/") for u in list_objects(root, storage)]
    assert len({w[0] for w in written}) == 1 and any(w[1] == "flags" for w in written)
