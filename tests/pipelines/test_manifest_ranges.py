"""A JSONL manifest is read in byte ranges by the tasks that use its rows: every line exactly
once whatever the range size (lines straddling a boundary, blank lines, CRLF, malformed and
non-UTF-8 lines), the same rows as reading the whole file, and in the run's main pass one
fused task from the byte range to the journalled rows, so no manifest row waits in the object
store for a CPU (bench/catalog_phases.py: the manifest was the object store's largest term)."""

from __future__ import annotations

import io
import json
import random

import pytest

from cluster.resources import plan_resources
from pipelines.manifest import _bytes_per_line, byte_ranges, check_columns, chunk_spans, estimated_rows, jsonl_lines_in_range, read_manifest, reads_in_ranges
from pipelines.plan import build_dataset
from pipelines.sample_catalog import write_sample_catalog
from pipelines.sources import SourcePolicy
from pipelines.stages import RunContext
from pipelines.storage import StorageConfig, arrow_filesystem


def _random_jsonl(rnd: random.Random) -> bytes:
    lines = []
    for i in range(rnd.randint(0, 12)):
        kind = rnd.random()
        if kind < 0.1:
            lines.append("")
        elif kind < 0.2:
            lines.append("not json é")
        elif kind < 0.3:
            lines.append(json.dumps({"sku": f"x{i}", "title": "ü" * rnd.randint(0, 5)}, ensure_ascii=False) + "\r")
        else:
            lines.append(json.dumps({"sku": f"s{i}", "title": "a" * rnd.randint(0, 40)}))
    data = "\n".join(lines).encode()
    if data and rnd.random() < 0.5:
        data += b"\n"
    if rnd.random() < 0.2:
        data += b"\xff\xfe{not utf-8}\n"
    return data


def test_byte_ranges_split_a_file_into_each_line_once():
    rnd = random.Random(3)
    for _ in range(200):
        data = _random_jsonl(rnd)
        whole = [line for line in data.decode("utf-8", "replace").split("\n") if line.strip()]
        for chunk in (1, 2, 3, 7, 16, 64, 10_000):
            f = io.BytesIO(data)
            got = [line for a, b in byte_ranges(len(data), chunk) for line in jsonl_lines_in_range(f, a, b, read_ahead=rnd.choice([1, 5, 1 << 16]))]
            assert [line for line in got if line.strip()] == whole, (data, chunk)
            # Any set of chunk indexes, neighbours merged into spans, reads the same lines as
            # those chunks read one by one (a fused task reads its blocks' chunks that way).
            ranges = byte_ranges(len(data), chunk)
            if not ranges:
                continue
            picked = rnd.sample(range(len(ranges)), rnd.randint(1, len(ranges)))
            one_by_one = [line for c in sorted(picked) for line in jsonl_lines_in_range(f, *ranges[c]) if line.strip()]
            merged = [line for a, b in chunk_spans(picked, len(data), chunk) for line in jsonl_lines_in_range(f, a, b) if line.strip()]
            assert merged == one_by_one and len(chunk_spans(picked, len(data), chunk)) <= len(picked)


def test_ranges_give_the_rows_of_the_whole_file(ray_session, tmp_path):
    rnd = random.Random(5)
    lines = [json.dumps({"sku": f"SKU-{i}", "image_uri": f"/photos/{i}.jpg", "title": "t" * rnd.randint(0, 300)}) for i in range(60)]
    lines[7] = "{broken"
    lines[20] = ""
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    storage = StorageConfig()
    assert reads_in_ranges(str(path), storage) == path.stat().st_size
    assert not reads_in_ranges(str(tmp_path / "m.csv"), storage)

    def rows(ds):
        return sorted((r["raw"], r["parse_error"] or "") for r in ds.take_all())

    whole = rows(read_manifest(str(path), storage, ["sku", "image_uri", "title"]))
    ranged = read_manifest(str(path), storage, ["sku", "image_uri", "title"], chunk_rows=4).materialize()
    assert ranged.num_blocks() > 5  # ~4 rows a range
    assert rows(ranged) == whole and len(whole) == 59
    assert sum(1 for _, err in whole if err) == 1  # the broken line is an error row


def test_a_finished_manifest_pass_leaves_nothing_in_the_object_store(ray_session, tmp_path):
    """The manifest pass's descriptor blocks, one per CPU task and all put in the object store
    when the pass starts, are one small column; and they leave the store once the pass is
    over. A consumed Dataset sits in reference cycles, so only Python's cycle collector frees
    its inputs: here it is off (it may well not run during a whole pass), and
    release_finished_passes must free them."""
    import gc
    import time

    from cluster.connect import object_store_bytes_used
    from pipelines.run import release_finished_passes

    blocks = 200
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"sku": f"SKU-{i:04d}", "image_uri": f"/photos/{i}.jpg"}) + "\n" for i in range(blocks)))

    def settled(limit_s: float = 10.0) -> int:  # frees reach the store asynchronously
        last, deadline = object_store_bytes_used(), time.monotonic() + limit_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = object_store_bytes_used()
            if now == last:
                return now
            last = now
        return last

    release_finished_passes()
    gc.disable()
    try:
        base = settled()
        # One chunk (one row here) per block, described by 64 rows, as a CPU batch of 64 needs.
        ds = read_manifest(str(path), StorageConfig(), ["sku", "image_uri"], chunk_rows=1, ranges_per_block=64)
        assert sum(len(b) for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")) == blocks
        del ds
        held = settled() - base
        release_finished_passes()
        left = settled() - base
    finally:
        gc.enable()
    assert 0 < held < blocks * 1200, f"{held / blocks:.0f} B a block"  # 64 (start, end) int64 rows took ~1.7 KB
    assert left < held / 10, (held, left)


@pytest.mark.parametrize("batches_a_block", [1, 3])
def test_main_pass_reads_parses_and_runs_ops_in_one_task(ray_session, tmp_path, batches_a_block):
    # A large catalog's blocks hold several CPU batches (ResourcePlan.for_rows): each task
    # then reads one chunk of that many rows and runs its batches one after another.
    import dataclasses

    import ray

    manifest = write_sample_catalog(tmp_path / "cat", 12)
    storage = StorageConfig()
    ctx = RunContext(run_id="t", output=str(tmp_path / "out"), recipe_refs=("enhance",), storage=storage,
                     sources=SourcePolicy.for_manifest(str(manifest), ()), recipe_fingerprints=(("enhance", "test"),))  # fmt: skip
    plan = plan_resources(ray.cluster_resources(), cpu_batch_size=2).for_rows(12)
    plan = dataclasses.replace(plan, block_rows=2 * batches_a_block)
    ds = build_dataset(ctx, str(manifest), check_columns(str(manifest), storage), plan)
    out = ds.take_all()
    assert sorted(r["sku"] for r in out if r["kind"] == "variant") == sorted(json.loads(line)["sku"] for line in manifest.read_text().splitlines())
    assert all(r["kind"] == "variant" for r in out), [r["message"] for r in out if r["kind"] != "variant"]
    stats = ds.stats()
    assert (12 // plan.rows_per_block > 2) == (batches_a_block == 1)
    fused = [line for line in stats.splitlines() if line.lstrip().startswith("Operator") and "FetchAndDecode" in line]
    assert len(fused) == 1 and "_read_jsonl_chunks" in fused[0] and "ParseRows" in fused[0] and "Finish" in fused[0], stats
    # One byte-range chunk (about one block's rows) per task, not several bundled into one.
    chunks = len(byte_ranges(manifest.stat().st_size, plan.rows_per_block * _bytes_per_line(*arrow_filesystem(str(manifest), storage))))
    assert chunks >= 2
    assert f"{chunks} tasks executed" in fused[0], stats


def test_a_gate_retry_pass_scans_ranges_and_keeps_only_its_skus(ray_session, tmp_path):
    # A retry pass wants a few skus out of the whole manifest: light range tasks keep only
    # their rows (nothing else reaches the object store, and there is no whole-file read),
    # then those rows are split into blocks for the CPU tasks.
    import dataclasses

    import ray

    from pipelines.state import PriorState

    manifest = write_sample_catalog(tmp_path / "cat", 12)
    skus = [json.loads(line)["sku"] for line in manifest.read_text().splitlines()]
    storage = StorageConfig()
    ctx = RunContext(run_id="t", output=str(tmp_path / "out"), recipe_refs=("enhance",), storage=storage,
                     sources=SourcePolicy.for_manifest(str(manifest), ()), recipe_fingerprints=(("enhance", "test"),))  # fmt: skip
    retry = tuple(sorted((sku, "enhance", 0, 2) for sku in skus[3:6]))
    plan = plan_resources(ray.cluster_resources(), cpu_batch_size=2).for_rows(12)
    ds = build_dataset(dataclasses.replace(ctx, retry=retry, prior=PriorState()), str(manifest), check_columns(str(manifest), storage), plan)
    out = ds.take_all()
    assert sorted(r["sku"] for r in out) == sorted(skus[3:6])
    assert all(r["kind"] == "variant" and r["attempt"] == 2 for r in out), [(r["kind"], r["message"]) for r in out]
    stats = ds.stats()
    ops = [line for line in stats.splitlines() if line.lstrip().startswith("Operator")]
    scan = [line for line in ops if "_read_jsonl_chunks" in line]
    assert len(scan) == 1 and "ParseRows" in scan[0] and "FetchAndDecode" not in scan[0], stats
    assert not any("ReadText" in line for line in ops), stats
    assert "Finish" in stats and "repartition" in stats.lower(), stats


def test_a_manifest_estimates_its_rows_from_its_size_before_any_pass(tmp_path):
    # `skustudio train` sizes its blocks from this (a run counts them in its duplicate-sku pass).
    path = tmp_path / "m.jsonl"
    rng = random.Random(3)
    path.write_text("".join(json.dumps({"sku": f"S-{i}", "image_uri": f"/i/{i}.jpg", "title": "x" * rng.randint(5, 80)}) + "\n" for i in range(5000)))
    assert 4500 <= estimated_rows(str(path), StorageConfig()) <= 5500
    assert estimated_rows(str(tmp_path / "m.csv"), StorageConfig()) == 0  # not read in ranges: blocks are cut by rows
