"""Autoscaling on Ray's fake multi-node provider: the cluster starts with no GPU worker; a run
with a GPU op makes the autoscaler add GPU nodes, the run finishes, and the idle GPU nodes are
removed afterwards. Records the time to the first GPU node."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipelines.sample_catalog import write_sample_catalog
from tests.cluster.local_cluster import LocalCluster

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def autoscaling_cluster():
    c = LocalCluster.start(head_cpus=2, autoscaling={"ray.worker.gpu": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 2}})
    try:
        yield c
    finally:
        c.stop()


def _gpu_nodes(cluster) -> int:
    return sum(1 for n in cluster.alive_nodes() if (n.get("resources_total") or {}).get("GPU", 0) > 0)


def test_gpu_nodes_scale_from_zero_and_back(autoscaling_cluster, tmp_path):
    cluster = autoscaling_cluster
    assert _gpu_nodes(cluster) == 0
    manifest = write_sample_catalog(tmp_path / "cat", 8)
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text(json.dumps({"name": "gpu-sharpen", "ops": [
        {"op": "sharpen", "resources": {"gpus": 1, "cpus": 0.5}, "pool": {"min_size": 1, "max_size": 2}}]}))  # fmt: skip
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def watch():
        t0 = time.monotonic()
        while not stop.is_set():
            try:
                seen.append((time.monotonic() - t0, _gpu_nodes(cluster)))
            except Exception:  # noqa: BLE001 - the state API can blink while nodes join
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    args = ["submit", "--address", cluster.dashboard, "--wait", "--", "--manifest", str(manifest), "--recipe", str(recipe),
            "--output", str(tmp_path / "out"), "--run-id", "auto1", "--max-gpus", "2"]  # fmt: skip
    try:
        done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"run did not finish in 300 s; GPU nodes seen {seen[-5:]}; autoscaler: {cluster.autoscaler_events()[-1500:]}\n{out[-3000:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    variants = pads.dataset(str(tmp_path / "out" / "auto1" / "variants"), format="parquet").to_table()
    assert len(variants) == 8

    # Idle GPU nodes are removed after the idle timeout (6 s here).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _gpu_nodes(cluster) > 0:
        time.sleep(1)
    stop.set()
    watcher.join(timeout=5)
    peak = max(n for _, n in seen)
    first_gpu = next(t for t, n in seen if n > 0)
    log.warning("autoscaling: first GPU node after %.1f s, peak %d GPU nodes", first_gpu, peak)
    assert 1 <= peak <= 2
    # Nodes are launched for demand only, never torn down and relaunched mid-run.
    assert "launch failed" not in cluster.autoscaler_events(), cluster.autoscaler_events()[-1500:]
    assert _gpu_nodes(cluster) == 0, "idle GPU nodes were not removed"
