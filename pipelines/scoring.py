"""Where a recipe's model-based scores (ops/quality_models.py) run.

By default Finish computes them on the CPU worker that encodes the row. A recipe whose
`scores:` declares GPUs (or a pool) gets its own actor-pool stage between its last op and
Finish instead: CLIP and the safety checker are ViT-sized models that take seconds per image
on a CPU and milliseconds per image batched on a GPU. The pool loads the models once per actor
and scores a batch of rows with one forward pass; Finish then uses the stored scores.
"""

from __future__ import annotations

import hashlib
import json
import time

from ops.base import Batch
from pipelines.model_store import ModelStore
from pipelines.recipes import Recipe
from pipelines.stages import WORK_KEYS, RunContext, _add_node, add_seconds, _columns, _fail, _init_worker, _rows, ready_instance, score_context, scorer_key


def scorer_label(recipe: Recipe) -> str:
    """'cpu' when the recipe's scores (if any) run in Finish, else the name of their actor pool
    (equal scorer configs in two recipes share it)."""
    step = recipe.scorer_step
    if not step.op.model_refs() or not (step.op.resources.uses_gpu or step.spec.pool is not None):
        return "cpu"
    cfg = json.dumps(step.op.config.model_dump(mode="json"), sort_keys=True)
    return f"score:{hashlib.sha256(cfg.encode()).hexdigest()[:8]}"


class ScoreModels:
    """Actor-pool stage: model scores for the rows whose recipe's scorers run under `label`,
    batched per recipe; a batch that fails is retried row by row so one bad row fails alone.
    Other rows (other recipes, errors, reused rows) pass through untouched."""

    def __init__(self, ctx: RunContext, label: str):
        self.ctx = ctx
        self.label = label
        self.recipes = ctx.recipes()
        self.store = ModelStore(ctx.model_cache, ctx.storage)
        self.here = {name for name, r in self.recipes.items() if scorer_label(r) == label}

    def __call__(self, batch: Batch) -> Batch:
        _init_worker()
        rows = _rows(batch)
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["recipe"] in self.here and not r["error"] and not r["reuse"]:
                groups.setdefault(r["recipe"], []).append(r)
        for name, group in groups.items():
            self._score(self.recipes[name], group)
        return _columns(rows, WORK_KEYS)

    def _score(self, recipe: Recipe, rows: list[dict]) -> None:
        try:
            scorer = ready_instance(scorer_key(self.ctx, recipe), recipe.scorer, self.store)
        except Exception as exc:  # noqa: BLE001 - a broken model fails its rows, not the run
            for r in rows:
                _fail(r, "score", exc)
            return
        t0 = time.perf_counter()
        try:
            results = scorer.score_batch([r["image"] for r in rows], [score_context(r) for r in rows])
        except Exception:  # noqa: BLE001 - isolate the failing row(s)
            results = []
            for r in rows:
                try:
                    results.append(scorer.score(r["image"], score_context(r)))
                except Exception as exc:  # noqa: BLE001
                    _fail(r, "score", exc)
                    results.append(None)
        per_row = (time.perf_counter() - t0) / len(rows)
        for r, scores in zip(rows, results):
            if scores is not None:
                r["model_scores"] = json.dumps(scores)
                r["duration_s"] = float(r["duration_s"]) + per_row
                add_seconds(r, "score_models", per_row)
                _add_node(r)
