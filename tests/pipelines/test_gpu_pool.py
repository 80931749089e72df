"""Ops that declare GPUs run on an ActorPoolStrategy stage (logical GPUs on this machine),
with setup() once per actor, and give the same pixels as the CPU path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from pipelines.plan import stage_sequence
from pipelines.recipes import load_recipe
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import write_sample_catalog


def _recipe(tmp_path, name, gpus):
    step = {"op": "sharpen", "params": {"amount": 1.0}}
    if gpus:
        step.update(resources={"gpus": gpus, "cpus": 0.5}, pool={"min_size": 1, "max_size": 2}, batch_size=3)
    spec = {"name": name, "ops": [{"op": "white_balance"}, step, {"op": "denoise"}], "output": {"format": "PNG"}}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps(spec))
    return str(p)


def test_stage_sequence_splits_cpu_and_pool_steps(tmp_path):
    gpu = load_recipe(_recipe(tmp_path, "gpu", 0.5))
    cpu = load_recipe(_recipe(tmp_path, "cpu", 0))
    labels = [s.label for s in stage_sequence([gpu, cpu])]
    assert labels[0] == "cpu" and labels[1].startswith("pool:sharpen:") and labels[2] == "cpu"


def test_gpu_declared_op_runs_on_actor_pool_and_matches_cpu(ray_session, tmp_path):
    manifest = write_sample_catalog(tmp_path / "cat", 3)
    out = tmp_path / "out"
    cfg = RunConfig(manifest=str(manifest), recipes=(_recipe(tmp_path, "gpu", 0.5), _recipe(tmp_path, "cpu", 0)), output=str(out), run_id="g")
    summary = run_catalog(cfg)
    assert summary.errors == 0 and summary.variants == 6
    rows = pq.read_table(out / "g" / "variants").to_pylist()
    by = {(r["sku"], r["recipe"]): r for r in rows}
    for sku in {r["sku"] for r in rows}:
        a = np.asarray(Image.open(by[(sku, "gpu")]["output_uri"]))
        b = np.asarray(Image.open(by[(sku, "cpu")]["output_uri"]))
        assert np.array_equal(a, b)  # same op, same pixels, wherever it ran
    record = json.loads((out / "g" / "_run.json").read_text())
    assert record["resources"]["cluster_gpus"] == 1.0


def test_gpu_op_on_a_cluster_without_gpus_fails_before_work(ray_session, tmp_path):
    import pytest

    manifest = write_sample_catalog(tmp_path / "cat", 1)
    cfg = RunConfig(manifest=str(manifest), recipes=(_recipe(tmp_path, "big", 4),), output=str(tmp_path / "o"), run_id="x")
    with pytest.raises(ValueError, match="needs 4 GPU per actor but the cluster has 1"):
        run_catalog(cfg)
    assert not (tmp_path / "o" / "x").exists()


def test_segmentation_on_a_gpu_pool_batches_and_matches_the_cpu_cutout(ray_session, tmp_path):
    """remove_background declared on GPUs runs on its own actor pool, several rows per op call
    (on a real GPU: onnxruntime-gpu where installed, else the graph on torch, batching rows
    together; these logical GPUs have no CUDA, so it runs on the CPU) and gives the CPU path's
    matte and confidence."""

    def cutout(name, gpus):
        step = {"op": "remove_background"}
        if gpus:
            step.update(resources={"gpus": gpus, "cpus": 0.5}, pool={"min_size": 1, "max_size": 1}, batch_size=3)
        spec = {"name": name, "ops": [step], "output": {"format": "PNG", "alpha": True}, "gate": {"score_mask_confidence": {"min": 0.5}}}
        p = tmp_path / f"{name}.yaml"
        p.write_text(json.dumps(spec))
        return str(p)

    gpu, cpu = load_recipe(cutout("seg-gpu", 0.5)), load_recipe(cutout("seg-cpu", 0))
    assert [s.label for s in stage_sequence([gpu])][0].startswith("pool:remove_background:")
    manifest = write_sample_catalog(tmp_path / "cat", 3)
    out = tmp_path / "out"
    summary = run_catalog(RunConfig(manifest=str(manifest), recipes=(cutout("seg-gpu", 0.5), cutout("seg-cpu", 0)), output=str(out), run_id="s"))
    assert summary.errors == 0 and summary.variants == 6
    by = {(r["sku"], r["recipe"]): r for r in pq.read_table(out / "s" / "variants").to_pylist()}
    for sku in {s for s, _ in by}:
        a, b = by[(sku, "seg-gpu")], by[(sku, "seg-cpu")]
        alpha_a = np.asarray(Image.open(a["output_uri"]))[..., 3].astype(int)
        alpha_b = np.asarray(Image.open(b["output_uri"]))[..., 3].astype(int)
        assert np.array_equal(alpha_a, alpha_b)  # on CUDA, cross-row batches may move it by 2/255
        assert a["score_mask_confidence"] == b["score_mask_confidence"]
        assert a["model"] == b["model"] == ["builtin:u2netp"]
