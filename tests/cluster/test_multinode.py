"""A run submitted through the Ray Jobs API (`skustudio submit --wait`) to a head and two
worker nodes started as real Ray processes on loopback: CPU work spreads over several nodes,
GPU-op actors land only on the nodes that advertise GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipelines.sample_catalog import write_sample_catalog
from tests.cluster.local_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
N = 12


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster.start(head_cpus=1, workers=[{"cpus": 1, "gpus": 1}, {"cpus": 1, "gpus": 1}])
    try:
        yield c
    finally:
        c.stop()


def _skustudio(args: list[str], env: dict, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_wait_runs_on_every_node_with_gpu_ops_on_gpu_nodes(cluster, tmp_path):
    manifest = write_sample_catalog(tmp_path / "cat", N)
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(json.dumps({
        "name": "gpu-clean",
        "ops": [
            {"op": "white_balance"},
            {"op": "sharpen", "params": {"amount": 0.8}, "resources": {"gpus": 1, "cpus": 0.5}, "pool": {"min_size": 1, "max_size": 2}},
            {"op": "auto_contrast"},
        ],
    }))  # fmt: skip
    out = tmp_path / "out"
    # The demo's catalog and recipes, plus a recipe with a GPU op.
    run_args = ["--manifest", str(manifest), "--recipe", "marketplace-main", "--recipe", "enhance", "--recipe", str(recipe),
                "--output", str(out), "--run-id", "mn1", "--cpu-batch-size", "2"]  # fmt: skip
    done = _skustudio(["submit", "--address", cluster.dashboard, "--wait", "--", *run_args], cluster.env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout

    everything = pads.dataset(str(out / "mn1" / "variants"), format="parquet").to_table().to_pylist()
    assert sorted({v["recipe"] for v in everything}) == ["enhance", "gpu-clean", "marketplace-main"] and len(everything) == 3 * N
    variants = [v for v in everything if v["recipe"] == "gpu-clean"]
    gpu_nodes = {n["node_id"] for n in cluster.alive_nodes() if (n.get("resources_total") or {}).get("GPU", 0) > 0}
    assert len(gpu_nodes) == 2
    # node_ids: [decode, cpu ops, gpu pool, cpu ops, finish] for this recipe.
    cpu_nodes = {nid for v in everything for i, nid in enumerate(v["node_ids"]) if not (v["recipe"] == "gpu-clean" and i == 2)}
    pool_nodes = {v["node_ids"][2] for v in variants}
    assert all(len(v["node_ids"]) == 5 for v in variants), variants[0]["node_ids"]
    assert pool_nodes <= gpu_nodes, (pool_nodes, gpu_nodes)
    assert len(cpu_nodes) >= 2, cpu_nodes  # CPU work spread over several nodes

    # The same run id again is refused by the Jobs API, with a message that says what to do.
    again = _skustudio(["submit", "--address", cluster.dashboard, "--", *run_args], cluster.env, timeout=120)
    assert again.returncode == 2 and "already submitted" in again.stderr
    status = _skustudio(["jobs", "status", "mn1", "--address", cluster.dashboard], cluster.env, timeout=60)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = _skustudio(["jobs", "logs", "mn1", "--address", cluster.dashboard], cluster.env, timeout=60)
    assert "variants" in logs.stdout


def test_a_bad_command_line_is_refused_before_submission(cluster):
    bad = _skustudio(["submit", "--address", cluster.dashboard, "--", "--manifest", "m.jsonl", "--recipes", "enhance"], cluster.env, timeout=60)
    assert bad.returncode == 2 and "not a valid `skustudio run` command line" in bad.stderr
