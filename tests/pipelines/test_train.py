"""`skustudio train` end to end on this machine: two Ray Train workers (gloo) fine-tune a
tiny Stable Diffusion's UNet with LoRA on sample-catalog photos that went through the run's
own fetch / decode / segmentation path; the adapter loads through the model store into
`scene`; a killed worker resumes from a checkpoint to the same weights."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from ops.base import Item, batch_of, identity_affine
from ops.models import LORA_WEIGHTS, TRAINING_CARD, ModelError, content_sha256
from ops.registry import op_class
from pipelines.model_store import ModelStore
from pipelines.sample_catalog import render_product, write_sample_catalog
from pipelines.train import TrainConfig, TrainDataError, train_adapter

# Half a CPU per worker: the session's Ray has 2 CPUs, and the examples' data pass needs one.
FAST = {"resolution": 32, "rank": 4, "steps": 8, "checkpoint_every": 3, "learning_rate": 5e-3, "workers": 2, "batch_size": 2, "cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_sample_catalog(tmp_path_factory.mktemp("train-cat"), 6)


def _cfg(catalog, tiny_models, out, **kw) -> TrainConfig:
    base = {"manifest": str(catalog), "base_model": str(tiny_models["sd"]), "output": str(out), "trigger": "sks", **FAST}
    return TrainConfig(**{**base, **kw})


def _scene(tiny_models, lora=None):
    params = {"model": str(tiny_models["sd_inpaint"]), "size": 64, "steps": 2}
    if lora:
        params["lora"] = lora
    op = op_class("scene")(params)
    r = render_product(3, product="bottle", background="plain", degradation="none", size=(96, 96))
    batch = batch_of([Item(r.photo, r.mask, identity_affine(), 7, {})], {"image": None, "title": ["glass bottle"], "category": ["bottles"], "attributes": ["{}"]})
    return op(batch)["image"][0]


def test_two_workers_train_an_adapter_that_scene_uses(ray_session, tmp_path, catalog, tiny_models):
    out = tmp_path / "adapter"
    s = train_adapter(_cfg(catalog, tiny_models, out, background_weight=0.1))
    # 1. It learned: the fixed-noise loss on the training photos fell.
    assert s.examples == 6 and s.steps == 8 and len(s.losses) == 8
    assert s.eval_loss_end < s.eval_loss_start, (s.eval_loss_start, s.eval_loss_end)
    # 2. The card says what made it.
    card = json.loads((out / TRAINING_CARD).read_text())
    assert card["base_model"]["sha256"] == content_sha256(tiny_models["sd"])
    assert card["data"]["examples"] == 6 and len(card["data"]["sha256"]) == 64
    assert (card["lora"]["rank"], card["learning_rate"], card["steps"], card["seed"]) == (4, 5e-3, 8, 0)
    assert card["caption_template"] == "a photo of {trigger} {title}" and card["trigger"] == "sks"
    assert card["loss_curve"] == s.losses and card["wall_s"] > 0
    # 3. The model store sees an adapter; scene with it differs from the base, scale 0 is the base.
    info = ModelStore().describe(str(out))
    assert info.kind == "lora" and info.class_name == "StableDiffusionPipeline"
    base = _scene(tiny_models)
    tuned = _scene(tiny_models, {"model": str(out), "scale": 1.0})
    zero = _scene(tiny_models, [{"model": str(out), "scale": 0.0}])
    assert not np.array_equal(base, tuned)
    assert np.array_equal(base, zero)


def test_a_killed_worker_resumes_to_the_same_adapter_and_a_rerun_resumes(ray_session, tmp_path, catalog, tiny_models):
    plain = train_adapter(_cfg(catalog, tiny_models, tmp_path / "plain"))
    cfg = _cfg(catalog, tiny_models, tmp_path / "killed", fault_at_step=5)
    killed = train_adapter(cfg)
    # The fault fired (after the step-3 checkpoint), and Ray Train resumed from there.
    assert (tmp_path / "killed.checkpoints" / killed.name / "_fault_injected").exists()
    assert killed.name == plain.name  # same data and settings; only the storage differs
    a, b = load_file(str(tmp_path / "plain" / LORA_WEIGHTS)), load_file(str(tmp_path / "killed" / LORA_WEIGHTS))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert killed.losses == plain.losses
    # The same command again finds the finished training and does no new steps.
    again = train_adapter(dataclasses.replace(cfg, fault_at_step=None))
    assert again.card["train_s"] == killed.card["train_s"] and again.losses == killed.losses


def test_bad_training_inputs_are_refused_before_any_training(ray_session, tmp_path, catalog, tiny_models):
    out = tmp_path / "adapter"
    with pytest.raises(ModelError, match="not found"):
        train_adapter(_cfg(catalog, tiny_models, out, base_model=str(tmp_path / "no-such-model")))
    with pytest.raises(ModelError, match="9 channels"):
        train_adapter(_cfg(catalog, tiny_models, out, base_model=str(tiny_models["sd_inpaint"])))
    with pytest.raises(ValueError, match="trigger 'two words'"):
        train_adapter(_cfg(catalog, tiny_models, out, trigger="two words"))
    with pytest.raises(TrainDataError, match="no usable manifest rows match the filter \\(categories=\\['spaceship'\\]\\)"):
        train_adapter(_cfg(catalog, tiny_models, out, categories=("spaceship",)))
    # A CSV manifest is read through a JSONL copy beside the adapter, removed afterwards.
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    as_csv = tmp_path / "catalog.csv"
    with as_csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sku", "image_uri", "category"])
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in ("sku", "image_uri", "category")} for r in rows)
        f.write("BAD,/x.jpg,bottles,one field too many\n")  # read whole, this line failed the read
    with pytest.raises(TrainDataError, match="no usable manifest rows match the filter \\(categories=\\['spaceship'\\]\\)"):
        train_adapter(_cfg(catalog, tiny_models, out, manifest=str(as_csv), categories=("spaceship",)))
    assert not [p for p in out.rglob("*") if p.is_file()]
    # A selected row whose image is missing is named, with what to do.
    rows = [json.loads(line) for line in catalog.read_text().splitlines()]
    rows[2]["image_uri"] = str(tmp_path / "gone.jpg")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TrainDataError, match=f"1 of 6 selected rows cannot be used \\({rows[2]['sku']} at fetch: .*--skip-bad-rows"):
        train_adapter(_cfg(catalog, tiny_models, out, manifest=str(bad)))
    assert not [p for p in out.rglob("*") if p.is_file()] and not (tmp_path / "adapter.checkpoints").exists()


def test_a_training_is_submitted_as_a_ray_job_with_a_checked_command_line():
    from cluster.jobs import run_entrypoint
    from pipelines.cli import check_run_args

    args = ["--manifest", "s3://shop/catalog.parquet", "--base-model", "s3://models/sd15", "--output", "s3://models/adapters/x", "--category", "shoes"]
    params = check_run_args(args, "train")
    assert params["category"] == ["shoes"] and params["base_model"] == "s3://models/sd15"
    assert run_entrypoint(args, "train").startswith("skustudio train --manifest s3://shop/catalog.parquet") and run_entrypoint(args, "train").endswith("--address auto")
    with pytest.raises(ValueError, match="not a valid `skustudio train` command line"):
        check_run_args(["--manifest", "m.jsonl"], "train")  # no base model, no output


def test_an_adapter_trained_from_s3_lands_in_the_s3_model_store(ray_session, s3_endpoint, bucket, tmp_path, catalog, tiny_models):
    from tests.conftest import upload

    from pipelines.storage import StorageConfig

    base = upload(s3_endpoint, bucket, "models/sd", tiny_models["sd"])
    inpaint = upload(s3_endpoint, bucket, "models/sd-inpaint", tiny_models["sd_inpaint"])
    out = f"s3://{bucket}/adapters/bottles"
    s = train_adapter(_cfg(catalog, tiny_models, out, base_model=base, s3_endpoint=s3_endpoint, steps=3, checkpoint_every=2, model_cache=str(tmp_path / "cache")))
    assert s.steps == 3
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix="adapters/")["Contents"]]
    assert any(k.startswith(f"adapters/bottles.checkpoints/{s.name}/") and k.endswith("/adapter_state.safetensors") for k in keys), keys
    # Checkpoints and the adapter went to S3; the store classifies and fetches the adapter like any model.
    store = ModelStore(tmp_path / "cache", StorageConfig(endpoint_url=s3_endpoint, region="us-east-1"))
    assert store.describe(out).kind == "lora"
    local = store.fetch(out)
    card = json.loads((local.path / TRAINING_CARD).read_text())
    assert card["base_model"]["sha256"] == content_sha256(tiny_models["sd"]) and card["steps"] == 3
    # scene with the S3 base and the S3 adapter, both through the store as a run fetches them.
    op = op_class("scene")({"model": inpaint, "size": 64, "steps": 2, "lora": {"model": out, "scale": 1.0}})
    op.bind_models({field: store.fetch(ref) for field, ref in op.model_refs().items()})
    assert set(op.model_refs()) == {"model", "lora.0"}
    r = render_product(3, product="bottle", background="plain", degradation="none", size=(96, 96))
    batch = batch_of([Item(r.photo, r.mask, identity_affine(), 7, {})], {"image": None, "title": ["glass bottle"], "category": ["bottles"], "attributes": ["{}"]})
    assert not np.array_equal(op(batch)["image"][0], _scene(tiny_models))
    # A recipe run names the adapter like any model: in each row's model / model_sha256.
    from pipelines.run import RunConfig, run_catalog
    import pyarrow.parquet as pq

    recipe = tmp_path / "tuned.yaml"
    recipe.write_text(json.dumps({"name": "tuned", "output": {"format": "PNG"}, "ops": [
        {"op": "remove_background"}, {"op": "compose", "params": {"size": 96, "fill": 0.8}},
        {"op": "scene", "params": {"model": inpaint, "size": 64, "steps": 2, "lora": {"model": out, "scale": 0.8}}}]}))  # fmt: skip
    small = tmp_path / "small.jsonl"
    small.write_text("".join(line + "\n" for line in catalog.read_text().splitlines()[:2]))
    run_catalog(RunConfig(manifest=str(small), recipes=(str(recipe),), output=str(tmp_path / "runs"), run_id="tuned", s3_endpoint=s3_endpoint, model_cache=str(tmp_path / "cache")))
    rows = pq.read_table(tmp_path / "runs" / "tuned" / "variants").to_pylist()
    assert len(rows) == 2 and all(r["model"][-1] == out and r["model_sha256"][-1] == local.sha256 for r in rows), rows
