"""Feeding the GPU pool: a phased op's CPU work (canvas, masks, paste-back) runs in CPU stages
around the pool, its actor only runs the model, and the pixels equal the op's own path."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ops.base import NO_MASK, Item, batch_of, identity_affine
from ops.composite import feather_alpha, product_core
from ops.registry import op_class
from pipelines.plan import stage_sequence
from pipelines.recipes import load_recipe
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import render_product
from pipelines.stages import EMPTY_IMAGE, FINISH, MODEL, WHOLE, WORK_KEYS, RunContext, RunSteps, _columns, worker_instance
from pipelines.storage import StorageConfig

FAST = {"size": 64, "steps": 2}


def _recipe(tmp_path, name: str, model: str, gpus: float) -> str:
    step = {"op": "scene", "params": {"model": model, "prompt": "{title} on a marble counter", **FAST}, "batch_size": 4}
    step["resources"] = {"gpus": gpus, "cpus": 1}
    p = tmp_path / f"{name}.yaml"
    p.write_text(json.dumps({"name": name, "output": {"format": "PNG"}, "ops": [step]}))
    return str(p)


def _products(n: int):
    sizes = [(96, 96), (120, 80), (72, 112), (100, 100), (90, 60)]
    return [render_product(i, background="plain", degradation="none", size=sizes[i % len(sizes)]) for i in range(n)]


def _work_rows(recipe: str, products) -> list[dict]:
    rows = []
    for i, p in enumerate(products):
        row = {k: None for k in WORK_KEYS}
        row.update(sku=f"SKU-{i}", title=p.title, category="kitchen", attributes="{}", recipe=recipe, variant=0, attempt=1, seed=1000 + i,
                   image=p.photo, source=p.photo, mask=p.mask, affine=identity_affine(), overlay_mask=NO_MASK, next_step=0, phase=WHOLE,
                   staged_image=EMPTY_IMAGE, staged_mask=NO_MASK, staged_meta="", duration_s=0.0, notes="", models="[]", nodes="[]",
                   op_scores="{}", op_seconds="{}", reuse="")  # fmt: skip
        rows.append(row)
    return rows


def _rows(batch) -> list[dict]:
    return [{k: batch[k][i] for k in batch} for i in range(len(batch["sku"]))]


def test_phased_op_leaves_cpu_work_to_cpu_stages_and_matches_the_op(tmp_path, tiny_models):
    recipe_path = _recipe(tmp_path, "scene", str(tiny_models["sd_inpaint"]), gpus=1)
    recipe = load_recipe(recipe_path)
    labels = [s.label for s in stage_sequence([recipe])]
    assert labels[0] == "cpu" and labels[1].startswith("pool:scene:") and labels[2] == "cpu" and len(labels) == 3
    ctx = RunContext(run_id="t", output=str(tmp_path / "out"), recipe_refs=(recipe_path,), storage=StorageConfig())
    cpu, pool = RunSteps(ctx, "cpu"), RunSteps(ctx, labels[1])
    # The pool's actor set its model up when it was built, before any batch reached it.
    assert worker_instance(pool._instance_key(recipe, 0), None)._ready

    products = _products(5)
    rows = _work_rows("scene", products)
    rows[3]["mask"] = np.zeros_like(rows[3]["mask"])  # no product: fails in the CPU stage
    batch = _columns(rows, WORK_KEYS)

    # 1. The pool gets rows that are not prepared yet: it does nothing to them.
    untouched = _rows(pool(batch))
    assert all(int(r["phase"]) == WHOLE and r["staged_image"].size == 0 and r["error"] is None for r in untouched)

    # 2. The CPU stage before the pool stages the canvas: 64 px long side, the row's aspect.
    prepared = _rows(cpu(batch))
    assert "no product" in prepared[3]["error"] or "mask" in prepared[3]["error"]
    ok = [r for r in prepared if r["error"] is None]
    assert len(ok) == 4 and all(int(r["phase"]) == MODEL for r in ok)
    assert {max(r["staged_image"].shape[:2]) for r in ok} == {64} and all(r["staged_mask"].shape == r["staged_image"].shape[:2] for r in ok)
    assert ok[1]["staged_image"].shape == (64, 64, 3)  # 120x80 at a 64 px long side: 64x43, rounded up to 64x64
    assert all(np.array_equal(r["image"], products[i].photo) for i, r in enumerate(prepared) if r["error"] is None)

    # 3. The pool runs the model only: canvas-sized output, the row's own image not touched.
    ran = _rows(pool(_columns(prepared, WORK_KEYS)))
    done_on_pool = [r for r in ran if r["error"] is None]
    assert all(int(r["phase"]) == FINISH and int(r["next_step"]) == 0 for r in done_on_pool)
    assert all(r["staged_mask"].size == 0 and r["staged_image"].dtype == np.uint8 for r in done_on_pool)
    assert all(r["image"].shape == products[int(r["sku"].split("-")[1])].photo.shape for r in done_on_pool)
    assert all(max(r["staged_image"].shape[:2]) == 64 for r in done_on_pool)
    spent = [json.loads(r["op_seconds"]) for r in done_on_pool]
    # The actor's start-up (model load) is charged once, across the first batch it serves.
    assert all(set(s) == {"scene.prepare", "scene", "scene.setup"} for s in spent)
    assert pool._setup_s == {}

    # 4. The CPU stage after the pool pastes back at full resolution.
    finished = _rows(cpu(_columns(ran, WORK_KEYS)))
    done = {r["sku"]: r for r in finished if r["error"] is None}
    assert len(done) == 4 and all(int(r["next_step"]) == 1 and int(r["phase"]) == WHOLE and r["staged_image"].size == 0 for r in done.values())
    assert all(set(json.loads(r["op_seconds"])) == {"scene.prepare", "scene", "scene.setup", "scene.finish"} for r in done.values())
    assert all(json.loads(r["models"])[0][0] == str(tiny_models["sd_inpaint"]) for r in done.values())

    # 5. Same pixels as the op called directly, all phases in one call.
    op = op_class("scene")(recipe.steps[0].op.config)
    for sku, r in done.items():
        i = int(sku.split("-")[1])
        item = Item(products[i].photo, products[i].mask, identity_affine(), 1000 + i, {"title": products[i].title, "category": "kitchen", "attributes": "{}", "sku": sku, "segment": None})
        direct = op(batch_of([item], {"image": None, "title": [products[i].title]}))["image"][0]
        assert np.array_equal(r["image"], direct), sku
        # The product's own pixels are kept; the background was regenerated.
        core = feather_alpha(product_core(products[i].mask, "scene"), 2.0) >= 1.0
        assert core.sum() > 100
        assert np.array_equal(r["image"][core], products[i].photo[core]) and not np.array_equal(r["image"], products[i].photo)


def test_compiled_batches_are_padded_to_one_shape(tiny_models):
    """A compiled UNet always sees max_batch rows; the padding rows' outputs are dropped."""
    op = op_class("scene")({"model": str(tiny_models["sd_inpaint"]), **FAST, "max_batch": 3})
    op.ensure_setup()
    assert op.compiled is False  # never compiled on the CPU
    calls = []
    pipe = op.pipe

    def recording(**kwargs):
        calls.append((len(kwargs["prompt"]), tuple(kwargs["image"].shape), len(kwargs["generator"])))
        return pipe(**kwargs)

    op.pipe = recording
    p = _products(1)[0]
    staged = op.prepare(Item(p.photo, p.mask, identity_affine(), 7, {"title": p.title, "category": "x"}))
    alone = op.generate([staged])
    op.compiled = True  # as on CUDA
    padded = op.generate([staged])
    assert calls[0] == (1, (1, 3, 64, 64), 1) and calls[1] == (3, (3, 3, 64, 64), 3)
    assert len(padded) == 1 and padded[0].shape == alone[0].shape == (64, 64, 3)
    # Padding only adds rows: with per-row generators the row's output stays within the
    # batch-arithmetic noise of the unpadded call (a few 1/255 steps, never a new image).
    assert np.abs(padded[0].astype(int) - alone[0].astype(int)).mean() < 2.0


def test_pool_and_whole_op_placements_write_identical_variants(ray_session, tmp_path, tiny_models):
    """The same scene recipe with its step on a logical-GPU pool (phased: prepare and finish
    in CPU stages) and as one CPU step (the op's own call) writes the same files."""
    cat = tmp_path / "cat"
    cat.mkdir()
    with (cat / "manifest.jsonl").open("w") as fh:
        for i, p in enumerate(_products(5)):
            path = cat / f"p{i}.png"
            Image.fromarray(np.dstack([p.photo, p.mask])).save(path)  # cut-outs: mask in alpha
            fh.write(json.dumps({"sku": f"SKU-{i}", "image_uri": str(path), "title": p.title}) + "\n")
    model = str(tiny_models["sd_inpaint"])
    runs = {}
    for placement, gpus in (("pool", 0.5), ("whole", 0)):
        recipe = _recipe(tmp_path / placement if (tmp_path / placement).mkdir() is None else None, "scene", model, gpus=gpus)
        out = tmp_path / f"out-{placement}"
        summary = run_catalog(RunConfig(manifest=str(cat / "manifest.jsonl"), recipes=(recipe,), output=str(out), run_id="r", num_gpus=1))
        assert summary.errors == 0 and summary.variants == 5
        runs[placement] = {r["sku"]: r for r in pq.read_table(out / "r" / "variants").to_pylist()}
    for sku, pool in runs["pool"].items():
        whole = runs["whole"][sku]
        assert pool["state_key"] == whole["state_key"]  # placement is not part of a variant's identity
        a, b = np.asarray(Image.open(pool["output_uri"])), np.asarray(Image.open(whole["output_uri"]))
        assert np.array_equal(a, b), sku
        assert {"scene.prepare", "scene", "scene.finish"} <= set(dict(pool["op_seconds"])) and "scene.prepare" not in dict(whole["op_seconds"])


def test_model_hash_is_cached_by_file_state(tmp_path, monkeypatch):
    """A model folder is read and hashed once per file state: a new process (empty memory
    cache) takes the hash from the node's cache; a changed file is hashed again."""
    import os

    from ops import models

    monkeypatch.setenv("SKUSTUDIO_HASH_CACHE", str(tmp_path / "hashes"))
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (model / "unet" / "weights.bin").write_bytes(os.urandom(4096))
    first = models.local_model(str(model)).sha256
    assert first == models.content_sha256(model)

    def no_reading(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(models, "_local_hashes", {})  # as in a fresh worker process
    monkeypatch.setattr(models, "content_sha256", no_reading)
    assert models.local_model(str(model)).sha256 == first

    (model / "unet" / "weights.bin").write_bytes(os.urandom(4097))  # new content, new size
    monkeypatch.setattr(models, "_local_hashes", {})
    import pytest

    with pytest.raises(AssertionError, match="read again"):
        models.local_model(str(model))
    monkeypatch.undo()
    monkeypatch.setenv("SKUSTUDIO_HASH_CACHE", str(tmp_path / "hashes"))
    second = models.local_model(str(model)).sha256
    assert second != first and second == models.content_sha256(model)


def test_diffusion_pool_batches_default_to_the_ops_batch(tmp_path, tiny_models):
    """A compiled UNet pads each call to max_batch, so the pool's batches match it unless the
    step sets its own batch_size."""
    from cluster.resources import ResourcePlan
    from pipelines.plan import pool_steps

    plan = ResourcePlan(cluster_cpus=8, cluster_gpus=1, gpu_batch_size=4)
    for batch_size, max_batch, expected in ((None, 12, 12), (6, 12, 6), (None, None, 16)):
        step = {"op": "scene", "params": {"model": str(tiny_models["sd_inpaint"]), **({"max_batch": max_batch} if max_batch else {})}}
        if batch_size:
            step["batch_size"] = batch_size
        p = tmp_path / f"r{batch_size}-{max_batch}.yaml"
        p.write_text(json.dumps({"name": "r", "ops": [step]}))
        pool = next(s for s in stage_sequence([load_recipe(str(p))]) if s.label != "cpu")
        assert plan.pool_for(pool_steps(pool)).batch_size == expected


def test_pool_concurrency_comes_from_the_recipe(tmp_path, tiny_models):
    """`pool: {concurrency: 2}` keeps two batches in flight per actor; without it, one."""
    from cluster.resources import ResourcePlan
    from pipelines.plan import pool_steps

    plan = ResourcePlan(cluster_cpus=8, cluster_gpus=1)
    for pool_spec, expected in ((None, 1), ({"min_size": 1, "max_size": 1, "concurrency": 2}, 2)):
        step = {"op": "scene", "params": {"model": str(tiny_models["sd_inpaint"])}, **({"pool": pool_spec} if pool_spec else {})}
        p = tmp_path / f"c{expected}.yaml"
        p.write_text(json.dumps({"name": "r", "ops": [step]}))
        pool = next(s for s in stage_sequence([load_recipe(str(p))]) if s.label != "cpu")
        assert plan.pool_for(pool_steps(pool)).concurrency == expected
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"name": "r", "ops": [{"op": "scene", "params": {"model": str(tiny_models["sd_inpaint"])}, "pool": {"concurrency": 0}}]}))
    import pytest

    with pytest.raises(Exception, match="concurrency"):
        load_recipe(str(bad))
