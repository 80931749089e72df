"""The quality gate with retries: a seeded variant that fails its gate is regenerated with the
next attempt's seed until it passes or reaches max_attempts; every attempt is a row; only
passing images are published under images/ (the rest under rejected/); deterministic
recipes are not retried."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
import pytest

from pipelines.run import RunConfig, retry_set, run_catalog
from pipelines.recipes import load_recipe
from pipelines.sample_catalog import write_sample_catalog
from pipelines.stages import derive_seed

# 64 px: too small for the invisible watermark, so a variant's pixels depend only on its seed
# and input (not on the recipe hash), and two runs of one recipe name are comparable.
PREP = [{"op": "remove_background"}, {"op": "compose", "params": {"size": 64, "fill": 0.8}}]


def _recipe(tmp_path, name, model, gate, file=None, **extra):
    spec = {"name": name, "variants": 2, "output": {"format": "PNG"}, "gate": gate, **extra,
            "ops": PREP + [{"op": "scene", "params": {"model": str(model), "prompt": "{title} on a table", "size": 64, "steps": 2}}]}  # fmt: skip
    p = tmp_path / f"{file or name}.yaml"
    p.write_text(json.dumps(spec))
    return str(p)


def _variants(out, run_id):
    return pq.read_table(out / run_id / "variants").to_pylist()


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _published(out, run_id, prefix):
    root = out / run_id / prefix
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return write_sample_catalog(tmp_path_factory.mktemp("gate-cat"), 2)


def test_failing_variants_are_retried_to_max_attempts_and_kept_out_of_images(ray_session, tmp_path, tiny_models, catalog):
    model = tiny_models["sd_inpaint"]
    never = _recipe(tmp_path, "never", model, {"score_colorfulness": {"max": -1}}, max_attempts=3)
    deterministic = tmp_path / "det.yaml"
    deterministic.write_text(json.dumps({"name": "det", "ops": PREP, "gate": {"score_width": {"min": 10_000}}, "max_attempts": 3}))
    out = tmp_path / "out"
    s = run_catalog(RunConfig(manifest=str(catalog), recipes=(never, str(deterministic)), output=str(out), run_id="g1"))
    rows = _variants(out, "g1")

    # 1. The seeded recipe: 2 skus x 2 variants, each tried 3 times with the attempt's own seed.
    seeded = [r for r in rows if r["recipe"] == "never"]
    assert len(seeded) == 2 * 2 * 3
    for r in seeded:
        assert r["seed"] == derive_seed(r["sku"], "never", r["variant"], r["attempt"] - 1)
        assert r["passed"] is False and any("score_colorfulness" in why for why in r["reasons"])
        assert "/g1/rejected/never" in r["output_uri"]
    by_variant = {}
    for r in seeded:
        by_variant.setdefault((r["sku"], r["variant"]), []).append(r["attempt"])
    assert all(sorted(a) == [1, 2, 3] for a in by_variant.values())
    assert len({r["output_sha256"] for r in seeded}) == len(seeded), "each attempt must be a new image"

    # 2. The deterministic recipe fails once with its reasons: a new seed would change nothing.
    det = [r for r in rows if r["recipe"] == "det"]
    assert len(det) == 2 and all(r["attempt"] == 1 and not r["passed"] and "score_width" in r["reasons"][0] for r in det)

    # 3. Nothing failed reaches images/; everything is under rejected/; counts say so.
    assert _published(out, "g1", "images") == []
    assert len(_published(out, "g1", "rejected")) == len(rows)
    assert (s.variants, s.passed, s.rejected, s.retried) == (6, 0, 6, 8)
    record = json.loads((out / "g1" / "_run.json").read_text())
    assert record["counts"]["rejected"] == 6 and record["counts"]["retried"] == 8


def test_retries_stop_at_the_first_passing_attempt(ray_session, tmp_path, tiny_models, catalog):
    """Run 1 measures every attempt's colourfulness with a gate nothing passes; run 2 (same
    recipe name, so the same seeds) sets a threshold between them, and each variant must stop
    at exactly the first attempt run 1 says passes it, with the same image bytes."""
    model = tiny_models["sd_inpaint"]
    out = tmp_path / "out"
    run_catalog(RunConfig(manifest=str(catalog), recipes=(_recipe(tmp_path, "mix", model, {"score_colorfulness": {"max": -1}}, file="probe"),),
                          output=str(out), run_id="probe"))  # fmt: skip
    probe = {(r["sku"], r["variant"], r["attempt"]): r for r in _variants(out, "probe")}
    values = sorted(r["score_colorfulness"] for r in probe.values())
    # A threshold far (> 0.5) from every measured value, so re-runs cannot land on its other side.
    cuts = [(b - a, (a + b) / 2) for a, b in zip(values, values[1:]) if b - a > 1.0]
    assert cuts, f"colourfulness of the attempts too close together to test with: {values}"
    # Some threshold, as a min or a max, must make a variant fail its first attempt and pass a later one.
    choice = None
    for t in sorted(c for _, c in cuts):
        for bound in ("min", "max"):
            ok = (lambda c: c >= t) if bound == "min" else (lambda c: c <= t)
            first = {(sku, v): next((a for a in (1, 2, 3) if ok(probe[(sku, v, a)]["score_colorfulness"])), None) for sku, v, _ in probe}
            if choice is None and any(a not in (1, None) for a in first.values()):
                choice = (bound, t, first)
    if choice is None:
        pytest.fail(f"no threshold among {cuts} makes a variant pass on a later attempt: {values}")
    bound, t, expected_first_pass = choice

    s = run_catalog(RunConfig(manifest=str(catalog), recipes=(_recipe(tmp_path, "mix", model, {"score_colorfulness": {bound: t}}),),
                              output=str(out), run_id="mixed"))  # fmt: skip
    rows = _variants(out, "mixed")
    for (sku, v), first in expected_first_pass.items():
        attempts = sorted((r for r in rows if (r["sku"], r["variant"]) == (sku, v)), key=lambda r: r["attempt"])
        assert [r["attempt"] for r in attempts] == list(range(1, (first or 3) + 1)), (sku, v, first)
        assert [r["passed"] for r in attempts] == [False] * (len(attempts) - 1) + [first is not None]
        for r in attempts:  # same seed, same pixels (the files differ: their XMP names the run)
            assert np.array_equal(_pixels(r["output_uri"]), _pixels(probe[(sku, v, r["attempt"])]["output_uri"])), (sku, v, r["attempt"])
        assert ("/images/" in attempts[-1]["output_uri"]) == (first is not None)
    assert s.passed == sum(1 for a in expected_first_pass.values() if a) and s.variants == 4
    assert len(_published(out, "mixed", "images")) == s.passed


def test_retry_set_follows_the_latest_attempt(ray_session, tmp_path):
    import ray

    spec = {"name": "r", "ops": [{"op": "scene", "params": {"model": str(tmp_path)}}], "gate": {"score_width": {"min": 1}}, "max_attempts": 3}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(spec))
    recipes = {"r": load_recipe(str(path))}

    def row(sku, v, attempt, passed, reused_from=None):
        return {"kind": "variant", "sku": sku, "recipe": "r", "variant": v, "attempt": attempt, "passed": passed, "reused_from": reused_from}

    rows = ray.data.from_items([
        row("a", 0, 1, False), row("a", 0, 2, True),          # passed on its retry: done
        row("b", 0, 1, False),                                # failed once: attempt 2 next
        row("c", 0, 1, False), row("c", 0, 2, False), row("c", 0, 3, False),  # at max_attempts
        row("d", 0, 1, False, reused_from="night-1"),         # carried from a committed run
        row("e", 1, 1, True),
    ])  # fmt: skip
    assert retry_set(rows, recipes) == [("b", "r", 0, 2)]
