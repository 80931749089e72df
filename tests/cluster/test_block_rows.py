"""Blocks grow with the catalog only past TARGET_BLOCKS: one CPU batch a block below it (the
finest balance), whole batches up to MAX_BLOCK_ROWS above it, so a 10M-row catalog makes
~78k blocks instead of 2.5M (Ray Data's driver holds ~7 KB per block: bench/ray_blocks.py)."""

from __future__ import annotations

import pytest

from cluster.resources import MAX_BLOCK_ROWS, TARGET_BLOCKS, plan_resources


@pytest.mark.parametrize("batch", [1, 4, 7, 64, 200])
def test_rows_per_block(batch):
    plan = plan_resources({"CPU": 8.0}, cpu_batch_size=batch)
    assert plan.rows_per_block == batch  # before the catalog is counted
    for rows in (0, 10, TARGET_BLOCKS * batch):
        assert plan.for_rows(rows).rows_per_block == batch
    cap = max(batch, MAX_BLOCK_ROWS - MAX_BLOCK_ROWS % batch)
    for rows in (TARGET_BLOCKS * batch + 1, 1_000_000, 10_000_000, 10**9):
        per = plan.for_rows(rows).rows_per_block
        assert per % batch == 0 and batch <= per <= cap
        blocks = -(-rows // per)
        assert blocks <= TARGET_BLOCKS or per == cap  # past the target only once blocks are as large as allowed
    if batch == 4:
        assert -(-10_000_000 // plan.for_rows(10_000_000).rows_per_block) == 78_125
