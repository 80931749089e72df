"""Generative recipes end to end on local Ray with a logical GPU, models from the S3 store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ops.models import BUILTIN_MODELS, ModelError, content_sha256
from ops.provenance import DIGITAL_SOURCE_TYPE, read_watermark, read_xmp
from pipelines.plan import stage_sequence
from pipelines.recipes import load_recipe
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import write_sample_catalog
from pipelines.storage import StorageConfig
from pipelines.verify import verify
from tests.conftest import upload

FAST = {"size": 64, "steps": 2}


def _write(tmp_path, spec) -> str:
    p = tmp_path / f"{spec['name']}.yaml"
    p.write_text(json.dumps(spec))
    return str(p)


@pytest.fixture
def s3_models(s3_endpoint, bucket, tiny_models):
    return {
        "inpaint": upload(s3_endpoint, bucket, "models/sd-inpaint", tiny_models["sd_inpaint"]),
        "sd": upload(s3_endpoint, bucket, "models/sd", tiny_models["sd"]),
        "esrgan": upload(s3_endpoint, bucket, "models/esrgan-x2.safetensors", tiny_models["esrgan_x2"]),
    }


def _prep():
    return [{"op": "remove_background"}, {"op": "compose", "params": {"size": 128, "fill": 0.8}}]


def test_scene_restyle_outpaint_upscale_recipe_end_to_end(ray_session, tmp_path, s3_models, tiny_models):
    studio = _write(tmp_path, {
        "name": "studio", "variants": 2, "output": {"format": "PNG"},
        "ops": _prep() + [
            {"op": "scene", "params": {"model": s3_models["inpaint"], "prompt": "{title} on a marble counter", **FAST}, "batch_size": 4},
            {"op": "restyle", "params": {"model": s3_models["sd"], "strength": 0.5, **FAST}},
            {"op": "outpaint", "params": {"model": s3_models["inpaint"], "aspect": "4:5", **FAST}},
            {"op": "upscale", "params": {"model": s3_models["esrgan"], "factor": 2, "tile": 64}},
        ],
    })  # fmt: skip
    ads = _write(tmp_path, {
        "name": "ads", "output": {"format": "PNG"},
        "ops": _prep() + [{"op": "segment_variants", "params": {"model": s3_models["inpaint"], **FAST, "segments": [
            {"id": "outdoor", "prompt": "{title} on a mountain trail"}, {"id": "office", "prompt": "{title} on a desk"}]}}],
    })  # fmt: skip
    # All generative steps of a recipe share one GPU actor pool.
    labels = [s.label for s in stage_sequence([load_recipe(studio)])]
    assert labels == ["cpu", "pool:scene+restyle+outpaint+upscale:" + labels[1].rsplit(":", 1)[1]]

    manifest = write_sample_catalog(tmp_path / "cat", 3)
    cache = tmp_path / "model-cache"
    cfg = RunConfig(manifest=str(manifest), recipes=(studio, ads), output=str(tmp_path / "out"), run_id="gen", model_cache=str(cache))
    summary = run_catalog(cfg)
    rows = pq.read_table(tmp_path / "out" / "gen" / "variants").to_pylist()
    errors_dir = tmp_path / "out" / "gen" / "errors"
    errors = pq.read_table(errors_dir).to_pylist() if errors_dir.exists() else []
    assert summary.variants == len(rows) and summary.errors == len(errors)
    assert len(rows) + len(errors) == 3 * 2 + 3 * 2 and len(rows) >= 8, errors

    inpaint_sha = content_sha256(tiny_models["sd_inpaint"])
    for r in (r for r in rows if r["recipe"] == "studio"):
        # remove_background's embedded segmentation model first, then the generative steps'.
        assert r["model"] == ["builtin:u2netp", s3_models["inpaint"], s3_models["sd"], s3_models["inpaint"], s3_models["esrgan"]]
        assert r["model_sha256"][1] == inpaint_sha == r["model_sha256"][3]
        # 128 px square -> outpaint 4:5 -> 128x160 -> x2.
        assert (r["width"], r["height"]) == (256, 320)
        assert Image.open(r["output_uri"]).size == (256, 320)
        assert math.isfinite(r["score_fidelity_ciede2000"])
    ads_rows = [r for r in rows if r["recipe"] == "ads"]
    for r in ads_rows:
        assert r["segment"] in ("outdoor", "office") and r["model_sha256"] == [BUILTIN_MODELS["u2netp"].sha256, inpaint_sha]
        # The product is the source's own pixels after the generator: invisible colour change.
        assert r["score_fidelity_ciede2000"] < 1.0
    by_sku: dict[str, set] = {}
    for r in ads_rows:
        by_sku.setdefault(r["sku"], set()).add((r["segment"], r["seed"]))
    assert all(len({s for s, _ in v}) == 2 and len({seed for _, seed in v}) == 2 for v in by_sku.values())
    studio_seeds = [(r["sku"], r["variant"], r["seed"]) for r in rows if r["recipe"] == "studio"]
    assert len({s for _, _, s in studio_seeds}) == len(studio_seeds)
    # Each model was downloaded once on this node, whatever the number of actors and rows.
    downloads = [json.loads(line)["ref"] for line in (cache / "downloads.log").read_text().splitlines()]
    assert sorted(downloads) == sorted(set(s3_models.values()))

    # Generated variants carry their provenance: the IPTC label in the file, and a watermark
    # that survives JPEG re-encoding at quality 85 and maps back to the row.
    for r in rows:
        data = Path(r["output_uri"]).read_bytes()
        label = read_xmp(data)
        assert r["ai_generated"] and label["Iptc4xmpExt:DigitalSourceType"] == DIGITAL_SOURCE_TYPE
        assert label["skustudio:sku"] == r["sku"] and label["skustudio:watermark"] == r["watermark_id"]
        assert f"{read_watermark(np.asarray(Image.open(r['output_uri']).convert('RGB'))):08x}" == r["watermark_id"]
    sample = rows[0]
    reencoded = tmp_path / "reposted.jpg"
    Image.open(sample["output_uri"]).convert("RGB").save(reencoded, "JPEG", quality=85)  # metadata stripped too
    found = verify(str(reencoded), StorageConfig(), str(tmp_path / "out"))
    assert not found.label and found.watermark_id == sample["watermark_id"]
    assert (found.row["sku"], found.row["recipe"], found.row["variant"]) == (sample["sku"], sample["recipe"], sample["variant"])
    assert verify(str(manifest.parent / "images" / f"{sample['sku']}.jpg"), StorageConfig()).found is False

    # A rerun reproduces the same images (seeds from sku, recipe, variant); --full, so the
    # images are generated again rather than carried forward from run "gen".
    run_catalog(RunConfig(manifest=str(manifest), recipes=(ads,), output=str(tmp_path / "out"), run_id="again", model_cache=str(cache), full=True))
    again = {(r["sku"], r["segment"]): r for r in pq.read_table(tmp_path / "out" / "again" / "variants").to_pylist()}
    for r in ads_rows:
        a = np.asarray(Image.open(r["output_uri"])).astype(int)
        b = np.asarray(Image.open(again[(r["sku"], r["segment"])]["output_uri"])).astype(int)
        # Run "gen" also ran the studio recipe, so Ray batched these rows differently; on the
        # CPU every model call is one row's, so that changes no pixel.
        assert np.array_equal(a, b), (np.abs(a - b).max(), (a != b).mean())
    assert len(downloads) == len((cache / "downloads.log").read_text().splitlines())  # no new download
    assert all(r["reused_from"] is None for r in again.values())


def test_a_missing_or_misfit_model_stops_the_run_before_any_work(ray_session, tmp_path, s3_models, bucket):
    bad = _write(tmp_path, {
        "name": "bad", "ops": _prep() + [
            {"op": "scene", "params": {"model": f"s3://{bucket}/models/not-uploaded", **FAST}},
            {"op": "restyle", "params": {"model": s3_models["inpaint"], **FAST}},
            {"op": "upscale", "params": {"model": s3_models["sd"]}},
        ],
    })  # fmt: skip
    manifest = write_sample_catalog(tmp_path / "cat", 1)
    cfg = RunConfig(manifest=str(manifest), recipes=(bad,), output=str(tmp_path / "out"), run_id="bad", model_cache=str(tmp_path / "c"))
    with pytest.raises(ModelError) as exc:
        run_catalog(cfg)
    msg = str(exc.value)
    assert "not-uploaded' not found" in msg
    assert "op 'restyle'" in msg and "9 input channels" in msg
    assert "op 'upscale'" in msg and "diffusers StableDiffusionPipeline directory" in msg
    assert not (tmp_path / "out" / "bad").exists() and not (tmp_path / "c" / "blobs").exists()
