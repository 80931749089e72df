"""Blocks follow the cluster, not the catalog: one CPU batch a block up to the plan's
target_blocks (~16 per CPU the cluster can reach, at least 256), then whole batches up to
MAX_BLOCK_ROWS. Each block costs Ray Data's driver ~7 KB (bench/ray_blocks.py) and the object
store one descriptor for the pass, so a 100k catalog must not make 10x the blocks of a 10k one."""

from __future__ import annotations

import pytest

from cluster.resources import BLOCKS_PER_CPU, MAX_BLOCK_ROWS, MIN_TARGET_BLOCKS, plan_resources


def blocks(plan, rows: int) -> int:
    return -(-rows // plan.for_rows(rows).rows_per_block)


@pytest.mark.parametrize("batch", [1, 4, 7, 64, 200])
def test_rows_per_block(batch):
    plan = plan_resources({"CPU": 8.0}, cpu_batch_size=batch)
    target = plan.target_blocks
    assert target == max(MIN_TARGET_BLOCKS, BLOCKS_PER_CPU * 8)
    assert plan.rows_per_block == batch  # before the catalog is counted
    for rows in (0, 10, target * batch):
        assert plan.for_rows(rows).rows_per_block == batch
    cap = max(batch, MAX_BLOCK_ROWS - MAX_BLOCK_ROWS % batch)
    for rows in (target * batch + 1, 100_000, 1_000_000, 10_000_000, 10**9):
        per = plan.for_rows(rows).rows_per_block
        assert per % batch == 0 and batch <= per <= cap
        assert blocks(plan, rows) <= target or per == cap  # past the target only once blocks are as large as allowed
    if batch == 4:
        assert blocks(plan, 10_000_000) == 10_000_000 // 1024 + 1  # ~9.8k blocks at 1,024 rows, not 2.5M


def test_the_block_count_is_flat_from_10k_to_100k_rows_on_a_small_cluster():
    plan = plan_resources({"CPU": 2.0}, cpu_batch_size=64)
    counts = {rows: blocks(plan, rows) for rows in (1_000, 10_000, 100_000)}
    assert counts[1_000] == 16 and counts[10_000] == 157  # one batch a block while under the target
    assert counts[100_000] <= MIN_TARGET_BLOCKS  # was 1,563 blocks at one batch a block
    assert counts[100_000] <= 1.5 * counts[10_000]


def test_an_autoscaling_cluster_is_cut_for_the_cpus_it_can_reach():
    head_only = plan_resources({"CPU": 0.0}, cpu_batch_size=4)
    assert head_only.target_blocks == MIN_TARGET_BLOCKS
    scaled = plan_resources({"CPU": 0.0}, cpu_batch_size=4, max_cpus=200)
    assert scaled.target_blocks == BLOCKS_PER_CPU * 200
    rows = 100_000
    # 16 blocks per reachable CPU (so the last wave of tasks is short), not the head's 256.
    assert blocks(scaled, rows) >= BLOCKS_PER_CPU * 200 * 0.9 > blocks(head_only, rows)
    assert "can reach 200 CPU" in scaled.describe()
