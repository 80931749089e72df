"""The prior state: a committed run and an interrupted attempt's journal, resharded by sku
through storage into sorted pages, must answer every sku's lookup exactly as a plain
in-memory computation over the same files does (journal rows win, a repeated journal write
counts once, gate attempts in order), with many shards, small pages and a small page cache,
and leave no scatter fragments behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import prior_index, state
from pipelines.schema import OUTPUT_SCHEMA, VARIANT_SCHEMA
from pipelines.storage import StorageConfig, StorageError, list_objects

SKUS = 700


def _rows(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def prior_files(tmp_path_factory):
    """OUT/_latest -> r1 with 3 variant part files; r2 has one interrupted attempt's journal."""
    rnd = random.Random(7)
    out = tmp_path_factory.mktemp("prior")
    committed, journal = [], []
    for i in range(SKUS):
        sku = f"sku-{rnd.randrange(10**6):06d}-{i}"
        for v in range(2):
            attempts = 2 if rnd.random() < 0.2 else 1  # a gate retry: two rows, in attempt order
            for a in range(1, attempts + 1):
                committed.append({"sku": sku, "recipe": "tidy", "variant": v, "attempt": a, "state_key": f"c-{i}-{v}-{a}", "run_id": "r1", "kind": "variant"})
        if rnd.random() < 0.3:  # the interrupted attempt redid variant 0 of this sku
            row = {"sku": sku, "recipe": "tidy", "variant": 0, "attempt": 1, "state_key": f"j-{i}", "run_id": "r2", "kind": "variant"}
            journal.append(row)
            if rnd.random() < 0.5:
                journal.append(dict(row))  # a retried journal write repeats the row
    rnd.shuffle(committed)
    for k in range(3):
        _write(out / "r1" / "variants" / f"part-{k}.parquet", _rows(VARIANT_SCHEMA, committed[k::3]))
    for k in range(0, len(journal), 40):
        _write(out / "r2" / "_journal" / "a0001" / f"b{k:05d}.parquet", _rows(OUTPUT_SCHEMA, journal[k : k + 40]))
    (out / "_latest").write_text(json.dumps({"run_id": "r1"}))
    return {"out": str(out), "committed": committed, "journal": journal}


def _expected(committed: list[dict], journal: list[dict]) -> dict[str, dict[tuple[str, int], list[tuple]]]:
    by_key: dict[tuple, dict[int, tuple]] = {}
    for origin, rows in (("committed", committed), ("journal", journal)):
        fresh: dict[tuple, dict[int, tuple]] = {}
        for r in rows:
            fresh.setdefault((r["sku"], r["recipe"], r["variant"]), {})[r["attempt"]] = (origin, r["attempt"], r["state_key"])
        by_key.update(fresh)  # the journal's rows replace the committed ones of their variant
    out: dict[str, dict] = {}
    for (sku, recipe, v), attempts in by_key.items():
        out.setdefault(sku, {})[(recipe, v)] = [attempts[a] for a in sorted(attempts)]
    return out


def test_paged_prior_matches_a_plain_join(ray_session, prior_files, monkeypatch):
    monkeypatch.setattr(state, "SHARD_ROWS", 300)  # ~6 shards
    monkeypatch.setattr(state, "SCATTER_ROWS", 400)  # ~4 scatter tasks
    monkeypatch.setattr(prior_index, "PAGE_ROWS", 16)
    monkeypatch.setattr(prior_index, "_CACHED_PAGES", 5)  # most lookups evict and reread
    prior_index.clear_cache()
    storage = StorageConfig()
    prior = state.load_prior(prior_files["out"], "r2", storage, attempt=2, full=False)
    assert prior.committed_run == "r1"
    assert prior.rows == len(prior_files["committed"]) + len(prior_files["journal"])
    assert prior.shards == -(-prior.rows // 300) and len(prior.present) == prior.shards
    files = list_objects(prior.prefix, storage)
    assert files and not any("/scatter/" in f for f in files), "gather must delete the scatter fragments"

    # Pages never split a sku: each is cut at PAGE_ROWS rows and runs on to the end of its last sku.
    for shard in prior.present:
        index = json.loads(Path(prior_index.index_uri(prior.prefix, shard)).read_text())
        firsts = [e[0] for e in index]
        assert firsts == sorted(firsts) and len(set(firsts)) == len(firsts)
        assert sum(e[3] for e in index) == prior_index.gather(shard, prior.prefix, storage)  # a retried gather: same answer
        for first, offset, length, _, size in index:
            packed = Path(prior_index.pages_uri(prior.prefix, shard)).read_bytes()[offset : offset + length]
            page = pa.ipc.open_stream(pa.Codec("lz4").decompress(packed, decompressed_size=size)).read_all()
            skus = page["sku"].to_pylist()
            assert skus[0] == first and skus == sorted(skus)
            assert skus.index(skus[-1]) < 16  # cut at 16 rows, then extended to the end of the last sku

    expected = _expected(prior_files["committed"], prior_files["journal"])
    skus = sorted(expected)
    random.Random(1).shuffle(skus)
    got = {}
    for k in range(0, len(skus), 50):  # batches, as a stage asks
        got.update(state.prior_rows_many(prior, skus[k : k + 50] + ["no-such-sku"]))
    assert set(expected) <= set(got) and not got.get("no-such-sku")
    for sku, variants in expected.items():
        seen = {k: [(r["origin"], r["attempt"], r["state_key"]) for r in rows] for k, rows in got[sku].items()}
        assert seen == variants, sku
    # One sku at a time gives the same answers (the page cache is warm for some, not others).
    for sku in skus[:40]:
        assert state.prior_rows(prior, sku) == got[sku]
    # A lost page file is a StorageError naming it (DecodeAndExpand then regenerates the batch).
    shard = state.shard_of(skus[0], prior.shards)
    Path(prior_index.pages_uri(prior.prefix, shard)).unlink()
    prior_index.clear_cache()
    with pytest.raises(StorageError, match=f"shard-{shard:05d}.pages"):
        state.prior_rows_many(prior, [skus[0]])


def test_full_run_has_no_prior(ray_session, prior_files):
    prior = state.load_prior(prior_files["out"], "r3", StorageConfig(), attempt=1, full=True)
    assert not prior and state.prior_rows_many(prior, ["sku-x"]) == {}


def test_scatter_groups_bound_each_task():
    counts = [8192] * 9 + [100_000] + [4] * 50 + [70_000, 3]
    groups = state.scatter_groups(counts, 65_536)
    assert [i for g in groups for i in g] == list(range(len(counts)))  # every file once, in order
    for g in groups:
        assert len(g) == 1 or sum(counts[i] for i in g) <= 65_536
    assert [len(g) for g in groups] == [8, 1, 1, 50, 1, 1]  # a file over the limit goes alone


def test_a_gather_retried_after_dying_mid_delete_keeps_every_row(tmp_path):
    """The gather task writes a shard's pages, then deletes its fragments. If it dies after
    deleting only some, its retry must not rebuild the shard from the fragments left: that
    would overwrite whole pages with part of the shard's rows."""
    storage, prefix = StorageConfig(), str(tmp_path / "prior")
    tables = [pa.table({"sku": [f"sku-{t}-{i:03d}" for i in range(40)], "shard": [0] * 40, "v": list(range(40))}) for t in range(2)]
    for t, table in enumerate(tables):
        prior_index.scatter(table, prefix, storage, task=f"t{t}")
    fragments, whole = prior_index.read_fragments(prefix, 0, storage)
    assert len(fragments) == 2 and len(whole) == 80
    # 1. The first try: pages and index written, then one fragment deleted before it died.
    prior_index.write_pages(whole, prefix, 0, storage, page_rows=16)
    Path(fragments[0]).unlink()
    # 2. The retry: every row is still in the shard, and no fragment is left.
    prior_index.clear_cache()
    assert prior_index.gather(0, prefix, storage, page_rows=16) == 80
    assert not any("/scatter/" in f for f in list_objects(prefix, storage))
    skus = whole["sku"].to_pylist()
    found = prior_index.lookup(prefix, storage, {0: skus})
    assert all(len(found[s]) == 1 for s in skus)
    # A shard no task scattered to is empty, not an error.
    assert prior_index.gather(1, prefix, storage) == 0
