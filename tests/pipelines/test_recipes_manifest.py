"""Recipes and manifests: validation before work, clear errors naming the bad value."""

from __future__ import annotations

import json

import pytest

from pipelines.manifest import ManifestError, check_columns, normalise_row
from pipelines.recipes import RecipeError, builtin_recipes, load_recipe
from pipelines.storage import StorageConfig, safe_key_part


def test_builtin_recipes_load_and_examples_are_the_same_files():
    from pathlib import Path

    assert {"marketplace-main", "enhance"} <= set(builtin_recipes())
    for name in ("marketplace-main", "enhance"):
        example = Path(__file__).resolve().parents[2] / "examples" / "recipes" / f"{name}.yaml"
        assert load_recipe(str(example)).hash == load_recipe(name).hash


def test_the_gpu_segmentation_example_is_marketplace_main_with_a_pool_for_the_mask():
    from pathlib import Path

    from pipelines.plan import pool_stages

    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "examples" / "recipes" / "marketplace-main-gpu.yaml"))
    # Same identity as the built-in: moving segmentation to GPUs reuses last night's variants.
    assert recipe.hash == load_recipe("marketplace-main").hash
    ((label, steps),) = pool_stages([recipe])
    assert label.startswith("pool:remove_background") and [s.op.name for s in steps] == ["remove_background"]
    assert steps[0].op.resources.gpus == 0.25 and steps[0].spec.batch_size == 32


def test_generative_example_plans_one_gpu_pool_for_ops_and_one_for_scores():
    from pathlib import Path

    from pipelines.plan import pool_stages

    recipe = load_recipe(str(Path(__file__).resolve().parents[2] / "examples" / "recipes" / "studio-scenes.yaml"))
    pools = pool_stages([recipe])
    assert [label.split(":")[0] for label, _ in pools] == ["pool", "score"]
    assert [s.op.name for s in pools[0][1]] == ["scene", "outpaint", "upscale"]
    (scorer,) = pools[1][1]
    assert scorer.op.resources.gpus == 0.25 and scorer.spec.batch_size == 16
    # Placement is not part of the recipe's identity: moving scores to a pool reuses last night's rows.
    assert "resources" not in str(recipe.canonical().get("scores"))


def test_recipe_hash_changes_with_params_and_covers_defaults(tmp_path):
    base = {"name": "r", "ops": [{"op": "sharpen"}]}
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    c = tmp_path / "c.yaml"
    a.write_text(json.dumps(base))
    b.write_text(json.dumps({**base, "ops": [{"op": "sharpen", "params": {"amount": 0.9}}]}))
    c.write_text(json.dumps({**base, "ops": [{"op": "sharpen", "params": {"amount": 0.6}}]}))  # 0.6 is the default
    ha, hb, hc = (load_recipe(str(p)).hash for p in (a, b, c))
    assert ha != hb and ha == hc


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"name": "r", "ops": [{"op": "blurr"}]}, "unknown op 'blurr'"),
        ({"name": "r", "ops": [{"op": "compose", "params": {"fill": 2}}]}, "ops\\[0\\].*'fill' = 2"),
        ({"name": "r", "ops": []}, "ops"),
        ({"name": "r", "ops": [{"op": "sharpen"}], "gate": {"score_bogus": {"min": 1}}}, "score_bogus"),
        ({"name": "../x", "ops": [{"op": "sharpen"}]}, "name"),
        ({"name": "r", "ops": [{"op": "remove_background"}], "output": {"format": "JPEG", "alpha": True}}, "output.alpha needs PNG or WEBP"),
        ({"name": "r", "ops": [{"op": "sharpen"}], "output": {"format": "PNG", "alpha": True}}, "add remove_background"),
        ({"name": "r", "ops": [{"op": "remove_background", "params": {"model": "/m/mine.onnx"}}]}, "set remove_background's model_type"),
        ({"name": "r", "ops": [{"op": "remove_background", "params": {"scales": [0.1]}}]}, "scales must each be within"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, recipe, message):
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(p))


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="marketplace-main"):
        load_recipe("no-such-recipe")


def test_missing_required_column_stops_before_work(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("sku,title\nA,x\n")
    with pytest.raises(ManifestError, match="no 'image_uri' column"):
        check_columns(str(m), StorageConfig())
    j = tmp_path / "m.jsonl"
    j.write_text('{"sku": "A", "image_uri": "a.jpg"}\nnot json\n')
    assert {"sku", "image_uri"} <= set(check_columns(str(j), StorageConfig()))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"sku": "", "image_uri": "a.jpg"}, "sku is empty"),
        ({"sku": "A", "image_uri": ""}, "image_uri is empty"),
        ({"sku": "A", "image_uri": "s3://"}, "not a valid s3"),
        ({"sku": "A", "image_uri": "http://x/a.jpg"}, "only s3://"),
        ({"sku": "A", "image_uri": "a.jpg", "attributes": "{not json"}, "not a JSON object"),
        ({"sku": "A", "image_uri": "a.jpg", "recipes": ["other"]}, "does not have"),
        ({"sku": "x" * 1000, "image_uri": "a.jpg"}, "1000 characters"),
    ],
)
def test_bad_rows_become_error_rows(row, message):
    out = normalise_row(row, ["enhance"])
    assert out["error"] and message in out["error"]


def test_good_row_normalises_attributes_and_recipes():
    out = normalise_row({"sku": " A1 ", "image_uri": "s3://b/k.jpg", "attributes": {"c": "red"}, "recipes": "enhance"}, ["enhance", "x"])
    assert out["error"] is None and out["sku"] == "A1" and json.loads(out["attributes"]) == {"c": "red"} and out["recipes"] == ["enhance"]


@pytest.mark.parametrize("sku", ["../../etc/x", "a/b/c", "..", "ñandú 鞋", "x" * 1000, "/abs"])
def test_key_parts_cannot_escape_and_stay_distinct(sku):
    part = safe_key_part(sku)
    assert "/" not in part and not part.startswith(".") and len(part) <= 60
    assert part != safe_key_part(sku + "!")
