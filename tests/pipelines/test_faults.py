"""Real faults, on loopback: a killed driver, a killed pool actor, an S3 endpoint that throttles
and drops connections, hostile inputs. Each run must end with exactly one row per
(sku, recipe, variant) or failed input, nothing lost, and nothing else affected."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.run import RunConfig, RunFailed, run_catalog
from pipelines.sample_catalog import render_product
from pipelines.storage import StorageConfig, arrow_filesystem
from tests.pipelines.bad_inputs import corpus
from tests.s3_proxy import FaultProxy

REPO = Path(__file__).resolve().parents[2]


def _write_catalog(root: Path, n: int, size=(512, 512), seed0=700) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        r = render_product(seed0 + i, size=size)
        path = root / "img" / f"{r.sku}.jpg"
        Image.fromarray(r.photo).save(path, "JPEG", quality=90)
        rows.append(json.dumps({"sku": r.sku, "image_uri": str(path), "title": r.title}))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _local_table(path: Path) -> list[dict]:
    return pads.dataset(str(path), format="parquet").to_table().to_pylist() if path.exists() else []


def _assert_exactly_once(variants: list[dict], n_skus: int, recipes: dict[str, int]) -> None:
    keys = [(r["sku"], r["recipe"], r["variant"]) for r in variants]
    assert len(keys) == len(set(keys)), "a (sku, recipe, variant) appears twice"
    assert len(keys) == n_skus * sum(recipes.values()), f"{len(keys)} rows, expected {n_skus * sum(recipes.values())}"


def _journal_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "_journal").rglob("*.parquet"))


# --------------------------------------------------------------------------- error budget


def test_a_large_run_where_every_row_failed_reports_the_errors(ray_session, tmp_path, monkeypatch):
    # Above LOCAL_ROWS rows the near-duplicate search runs as Ray shuffles, which fail on a
    # dataset with no variant rows; a night where every fetch failed (a wrong bucket policy, say)
    # must still end in the error-budget message, not a shuffle's traceback. LOCAL_ROWS = 0
    # takes the shuffle path at this size.
    from pipelines import duplicates

    monkeypatch.setattr(duplicates, "LOCAL_ROWS", 0)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"sku": f"GONE-{i}", "image_uri": str(tmp_path / f"gone{i}.jpg")}) + "\n" for i in range(5)))
    cfg = RunConfig(manifest=str(manifest), recipes=("enhance",), output=str(tmp_path / "out"), run_id="dark")
    with pytest.raises(RunFailed, match=r"5 of 5 output rows failed .*Errors by stage: \{'fetch': 5\}"):
        run_catalog(cfg)


def test_too_many_failures_commit_nothing_and_a_rerun_finishes(ray_session, tmp_path):
    manifest = _write_catalog(tmp_path / "cat", 4, size=(256, 256))
    lines = manifest.read_text().splitlines() + [json.dumps({"sku": f"GONE-{i}", "image_uri": str(tmp_path / f"gone{i}.jpg")}) for i in range(3)]
    manifest.write_text("\n".join(lines) + "\n")
    cfg = RunConfig(manifest=str(manifest), recipes=("enhance",), output=str(tmp_path / "out"), run_id="budget", max_error_rate=0.1)
    with pytest.raises(RunFailed, match=r"3 of 7 output rows failed .* > max_error_rate 10.0%.*--run-id budget"):
        run_catalog(cfg)
    run_dir = tmp_path / "out" / "budget"
    assert not (run_dir / "_run.json").exists() and not (tmp_path / "out" / "_latest").exists()
    assert not (run_dir / "variants").exists()
    assert sum(len(pq.read_table(f)) for f in _journal_files(run_dir)) == 7  # every row journaled

    # The same run id again, with a budget that admits the missing files: nothing is redone.
    summary = run_catalog(RunConfig(**{**cfg.__dict__, "max_error_rate": 0.5}))
    assert summary.attempt == 2 and summary.resumed == 4 and summary.generated == 0 and summary.errors == 3
    variants = _local_table(run_dir / "variants")
    errors = _local_table(run_dir / "errors")
    _assert_exactly_once(variants, 4, {"enhance": 1})
    assert sorted(e["sku"] for e in errors) == ["GONE-0", "GONE-1", "GONE-2"]
    assert all(e["stage"] == "fetch" and "no file at" in e["message"] for e in errors)
    assert all(r["run_attempt"] == 1 for r in variants)
    assert json.loads((tmp_path / "out" / "_latest").read_text())["run_id"] == "budget"


# --------------------------------------------------------------------------- killed driver


def test_driver_killed_mid_run_then_rerun_is_exactly_once_and_does_less(ray_session, tmp_path):
    n = 24
    manifest = _write_catalog(tmp_path / "cat", n, size=(640, 640))
    out = tmp_path / "out"
    run_dir = out / "k1"
    gcs = ray_session.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "w")
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--manifest", str(manifest), "--recipe", "enhance",
           "--output", str(out), "--run-id", "k1", "--address", gcs]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not _journal_files(run_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, f"driver ended before the kill: {(tmp_path / 'driver.log').read_text()[-2000:]}"
        assert _journal_files(run_dir), "no batch finished within 240 s"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (run_dir / "_run.json").exists()
    time.sleep(2)  # let Ray reap the dead driver's workers
    done_before = {(r["sku"], r["variant"]) for f in _journal_files(run_dir) for r in pq.read_table(f).to_pylist() if r["kind"] == "variant"}

    summary = run_catalog(RunConfig(manifest=str(manifest), recipes=("enhance",), output=str(out), run_id="k1"))
    assert summary.attempt == 2
    assert summary.resumed >= len(done_before) > 0
    assert summary.generated == n - summary.resumed < n  # less work than a full run
    variants = _local_table(run_dir / "variants")
    _assert_exactly_once(variants, n, {"enhance": 1})
    assert _local_table(run_dir / "errors") == []
    for r in variants:
        assert Path(r["output_uri"]).is_file()
    assert sum(r["run_attempt"] == 1 for r in variants) == summary.resumed


# --------------------------------------------------------------------------- killed actor

POOLED = """
name: pooled
ops:
  - op: denoise
    params: {strength: 12, search_window: 31}  # slow on purpose: the killer must find the pool mid-run
    pool: {min_size: 1, max_size: 1}
  - op: sharpen
"""


def test_pool_actor_killed_mid_run_is_restarted_and_rows_redone(ray_session, tmp_path):
    from ray.util.state import list_actors

    # This session's Ray by address: without one, the state API refuses when the machine runs
    # another Ray instance (another test run, a developer's cluster).
    address = ray_session.get_runtime_context().gcs_address

    n = 24
    manifest = _write_catalog(tmp_path / "cat", n, size=(640, 640), seed0=900)
    recipe = tmp_path / "pooled.yaml"
    recipe.write_text(POOLED)
    run_dir = tmp_path / "out" / "a1"
    killed: list[int] = []
    seen: list[str] = []

    def kill_one_actor():
        # Once the first batch has come out of the pool, kill the pool's actor process.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            if _journal_files(run_dir):
                try:
                    actors = list_actors(address, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True, timeout=20)
                except Exception as exc:  # noqa: BLE001 - the state API can time out on a loaded machine: ask again
                    seen.append(f"state API: {exc!r}"[:200])
                    continue
                for a in actors:
                    seen.append(f"{a.class_name}:{a.state}:{a.pid}")
                    if a.class_name.startswith("MapWorker") and "RunSteps" in a.class_name and a.state == "ALIVE" and a.pid:
                        os.kill(a.pid, signal.SIGKILL)
                        killed.append(a.pid)
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    summary = run_catalog(RunConfig(manifest=str(manifest), recipes=(str(recipe),), output=str(tmp_path / "out"), run_id="a1"))
    killer.join(timeout=5)
    assert killed, f"no pool actor was found to kill mid-run; saw {seen[-10:]}"
    assert summary.errors == 0 and summary.generated == n
    variants = _local_table(run_dir / "variants")
    _assert_exactly_once(variants, n, {"pooled": 1})
    restarted = [a for a in list_actors(address, limit=10_000, detail=True) if "MapWorker" in a.class_name and a.pid != killed[0] and (a.num_restarts or 0) >= 1]
    assert restarted, "Ray did not restart the killed actor"


# --------------------------------------------------------------------------- S3 faults + corpus


@pytest.fixture(scope="module")
def corpus_run(ray_session, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="corpus")
    cases = corpus()
    for c in cases:
        if c.data is not None:
            s3.put_object(Bucket="corpus", Key=f"img/{c.key}", Body=c.data)
    good = "s3://corpus/img/good1.jpg"
    lines = [json.dumps({"sku": c.sku, "image_uri": f"s3://corpus/img/{c.key}", "title": "t"}, ensure_ascii=False) for c in cases]
    lines += [
        "",  # blank lines are not rows
        json.dumps({"sku": "DUP", "image_uri": good}),
        json.dumps({"sku": "DUP", "image_uri": "s3://corpus/img/good2.png"}),  # same sku, other image: one kept
        json.dumps({"sku": "TWIN", "image_uri": good}),
        json.dumps({"sku": "TWIN", "image_uri": good}),  # verbatim repeat: folded
        json.dumps({"sku": 12345, "image_uri": good}),  # a number where text belongs: read as text
        json.dumps({"sku": "ATTR-BAD", "image_uri": good, "attributes": 7}),
        "   ",
        '{"sku": "CUT-OFF", "image_uri": "s3://corp',  # truncated last line
    ]
    s3.put_object(Bucket="corpus", Key="manifest.jsonl", Body="\n".join(lines).encode())
    with FaultProxy(s3_endpoint, fault_rate=0.12, seed=7, deny=("/img/denied/",)) as proxy:
        cfg = RunConfig(manifest="s3://corpus/manifest.jsonl", recipes=("enhance",), output="s3://corpus/out", run_id="c1",
                        s3_endpoint=proxy.url, max_error_rate=1.0, sse="AES256")  # fmt: skip
        summary = run_catalog(cfg)
        outcomes = {o: sum(1 for r in proxy.log if r.outcome == o) for o in ("ok", "slowdown", "unavailable", "drop", "denied")}
    fs, path = arrow_filesystem("s3://corpus/out/c1", StorageConfig(endpoint_url=s3_endpoint, region="us-east-1"))
    variants = pads.dataset(f"{path}/variants", filesystem=fs, format="parquet").to_table().to_pylist()
    errors = pads.dataset(f"{path}/errors", filesystem=fs, format="parquet").to_table().to_pylist()
    return {"cases": cases, "summary": summary, "variants": variants, "errors": errors, "outcomes": outcomes, "s3": s3,
            "manifest_rows": len([ln for ln in lines if ln.strip()])}  # fmt: skip


def test_faults_were_injected_and_nothing_was_lost(corpus_run):
    o = corpus_run["outcomes"]
    assert o["slowdown"] > 0 and o["unavailable"] > 0 and o["drop"] > 0, o
    # Every manifest row ends as variants or one error row; TWIN's repeat is folded into one.
    skus_with_variants = {v["sku"] for v in corpus_run["variants"]}
    error_rows = corpus_run["errors"]
    assert len(skus_with_variants) + len(error_rows) == corpus_run["manifest_rows"] - 1
    keys = [(v["sku"], v["recipe"], v["variant"]) for v in corpus_run["variants"]]
    assert len(keys) == len(set(keys))
    assert corpus_run["summary"].duplicate_rows == 1


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.sku[:20])
def test_each_bad_input_has_its_outcome(corpus_run, case):
    sku = case.sku[:512]
    variants = [v for v in corpus_run["variants"] if v["sku"] == sku]
    errors = [e for e in corpus_run["errors"] if e["sku"] == sku]
    if case.expect == "ok":
        assert len(variants) == 1 and not errors, errors
        # Published only when it passed the gate (the half-black EXIF-ROT photo clips its shadows).
        prefix = "images" if variants[0]["passed"] else "rejected"
        assert variants[0]["output_uri"].startswith(f"s3://corpus/out/c1/{prefix}/enhance-")
        assert ".." not in variants[0]["output_uri"]
    else:
        assert not variants and len(errors) == 1
        assert errors[0]["stage"] == case.stage and case.expect in errors[0]["message"], errors[0]


def test_inputs_that_need_care_come_out_right(corpus_run):
    by_sku = {v["sku"]: v for v in corpus_run["variants"]}
    assert by_sku["EXIF-ROT"]["height"] > by_sku["EXIF-ROT"]["width"]  # shown upright
    assert "first frame" in by_sku["GIF-ANIM"]["notes"]
    assert by_sku["ONE-PX"]["width"] == 1
    assert "12345" in by_sku
    errors = {e["sku"]: e for e in corpus_run["errors"]}
    assert "listed 2 times" in errors["DUP"]["message"] and "good1.jpg" in errors["DUP"]["message"]
    assert by_sku["DUP"]["source_uri"].endswith("good1.jpg")
    assert "attributes" in errors["ATTR-BAD"]["message"]
    # One photo listed under several SKUs is flagged on each of them.
    assert {"a/b/c", "12345", "TWIN", "../../etc/x"} <= set(by_sku["GOOD-1"]["shared_source_skus"])
    assert by_sku["GOOD-2"]["shared_source_skus"] == []
    assert errors[""]["stage"] == "manifest" and "not valid JSON" in errors[""]["message"]


def test_every_write_is_encrypted_and_no_secret_is_recorded(corpus_run):
    s3 = corpus_run["s3"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="corpus", Prefix="out/") for o in p.get("Contents", [])]
    assert any("/variants/" in k for k in keys) and any(k.endswith("_run.json") for k in keys)
    for key in keys:
        assert s3.head_object(Bucket="corpus", Key=key).get("ServerSideEncryption") == "AES256", key
        body = s3.get_object(Bucket="corpus", Key=key)["Body"].read()
        if key.endswith(".parquet"):
            body = json.dumps(pq.read_table(io.BytesIO(body)).to_pylist(), default=str).encode()
        assert secret not in body, key
    record = json.loads(s3.get_object(Bucket="corpus", Key="out/c1/_run.json")["Body"].read())
    assert record["config"]["sse"] == "AES256" and "@" not in (record["config"]["s3_endpoint"] or "")


def test_sku_values_cannot_escape_the_run_prefix(corpus_run):
    for v in corpus_run["variants"]:
        rel = v["output_uri"].removeprefix(f"s3://corpus/out/c1/{'images' if v['passed'] else 'rejected'}/")
        parts = rel.split("/")
        assert len(parts) == 3 and all(p not in ("", ".", "..") for p in parts), v["output_uri"]
    assert np.all([v["output_uri"].isascii() for v in corpus_run["variants"]])


# --------------------------------------------------------------------------- two drivers


def test_a_driver_overtaken_by_a_second_driver_does_not_commit(ray_session, tmp_path, monkeypatch):
    """Two drivers on one run id (a manual rerun while the nightly still runs): the earlier
    one must not commit over the later one, which reuses its journal and commits itself."""
    import pipelines.run as run_module
    from pipelines.run import check_sole_driver
    from pipelines.schema import OUTPUT_SCHEMA

    n = 6
    manifest = _write_catalog(tmp_path / "cat", n, seed0=950)
    run_dir = tmp_path / "out" / "d1"
    summarise = run_module._summarise

    def second_driver_appears(*args, **kwargs):
        # After this driver's work, before its commit: a second driver's attempt-2 journal lands.
        assert _journal_files(run_dir), "the first driver journalled nothing"
        (run_dir / "_journal" / "a0002").mkdir(parents=True, exist_ok=True)
        pq.write_table(OUTPUT_SCHEMA.empty_table(), run_dir / "_journal" / "a0002" / "other-driver.parquet")
        return summarise(*args, **kwargs)

    monkeypatch.setattr(run_module, "_summarise", second_driver_appears)
    cfg = RunConfig(manifest=str(manifest), recipes=("enhance",), output=str(tmp_path / "out"), run_id="d1")
    with pytest.raises(RunFailed, match=r"another driver started this run id after this one \(attempt 2 > 1\)"):
        run_catalog(cfg)
    monkeypatch.setattr(run_module, "_summarise", summarise)
    assert not (run_dir / "_run.json").exists() and not (tmp_path / "out" / "_latest").exists()
    assert not (run_dir / "variants").exists()
    # The later driver's part: a rerun of the run id commits, reusing the first driver's rows.
    summary = run_catalog(cfg)
    assert summary.attempt == 3 and summary.resumed == n and summary.generated == 0
    _assert_exactly_once(_local_table(run_dir / "variants"), n, {"enhance": 1})
    # And a driver that finds the run committed under it refuses too.
    with pytest.raises(RunFailed, match="another driver committed this run id"):
        check_sole_driver("d1", str(run_dir), 3, StorageConfig())
