"""report.html in a real browser: headless Chromium loads the file a run wrote, the test reads
the key figures back from the DOM Chromium built and takes a screenshot."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.report import render, write_report
from pipelines.report_figures import final_mask, gather
from pipelines.run import RunConfig, run_catalog
from pipelines.sample_catalog import write_sample_catalog
from pipelines.storage import StorageConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it: apt-get install chromium)")


class _Dom(HTMLParser):
    """Elements by id and elements with data-* attributes, with their text."""

    def __init__(self):
        super().__init__()
        self.by_id: dict[str, dict] = {}
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if "id" in el["attrs"]:
            self.by_id[el["attrs"]["id"]] = el
        if tag not in ("img", "br", "meta", "rect", "input"):
            self._open.append(el)

    def handle_endtag(self, tag):
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data):
        for el in self._open:
            el["text"] += data

    def having(self, attr: str, value: str | None = None) -> list[dict]:
        return [e for e in self.elements if attr in e["attrs"] and (value is None or e["attrs"][attr] == value)]


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def finished_run(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    manifest = write_sample_catalog(root / "cat", 4)
    with manifest.open("a") as f:  # one input that cannot be fetched: an error row
        f.write(json.dumps({"sku": "MISSING-1", "image_uri": str(root / "nope.jpg"), "title": "gone"}) + "\n")
    strict = root / "strict.yaml"  # a gate nothing passes: every variant rejected, once (no seed)
    strict.write_text(json.dumps({"name": "strict", "ops": [{"op": "sharpen"}], "gate": {"score_width": {"min": 100_000}}}))
    out = root / "out"
    summary = run_catalog(RunConfig(manifest=str(manifest), recipes=("marketplace-main", str(strict)), output=str(out), run_id="r1", max_error_rate=0.5, part_rows=3))
    return summary, out / "r1"


def test_run_writes_report_with_the_run_figures(finished_run):
    summary, run_dir = finished_run
    assert summary.report_uri == str(run_dir / "report.html") and (run_dir / "report.html").is_file()
    k = gather(str(run_dir), StorageConfig()).key
    assert (k["variants"], k["passed"], k["rejected"], k["errors"]) == (summary.variants, summary.passed, summary.rejected, summary.errors)
    assert (k["variants"], k["rejected"], k["errors"]) == (8, 4, 1)  # 4 products x 2 recipes; strict rejects its 4
    # part_rows=3: the commit wrote several small part files (whole journal files each, one
    # CPU batch's rows), which the report reads as one run.
    parts = sorted((run_dir / "variants").glob("*.parquet"))
    assert len(parts) >= 2 and sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == k["variants"]
    variants = pq.read_table(run_dir / "variants").to_pylist()
    assert k["passed"] == sum(1 for r in variants if r["recipe"] == "marketplace-main" and r["passed"])
    assert k["throughput"] and k["throughput"] > 0 and k["worker_s_per_variant"] > 0
    assert all(("/rejected/" in r["output_uri"]) != r["passed"] for r in variants)


def test_report_command_rewrites_it(finished_run, tmp_path):
    _, run_dir = finished_run
    (run_dir / "report.html").unlink()
    uri = write_report(str(run_dir), StorageConfig(), max_skus=2)
    page = Path(uri).read_text()
    assert "data-shown='2'" in page and "data-total='5'" in page and "3 more SKUs not shown" in page
    with pytest.raises(ValueError, match="no committed run"):
        write_report(str(tmp_path), StorageConfig())


@needs_chromium
def test_report_opens_in_chromium_with_the_right_numbers(finished_run, tmp_path):
    summary, run_dir = finished_run
    write_report(str(run_dir), StorageConfig())
    url = (run_dir / "report.html").resolve().as_uri()
    dumped = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], tmp_path / "profile1")
    assert dumped.returncode == 0 and "<html" in dumped.stdout, dumped.stderr[-2000:]
    dom = _Dom()
    dom.feed(dumped.stdout)

    # 1. Key figures, as the browser parsed them.
    def kpi(name):
        return dom.by_id[f"kpi-{name}"]["text"].strip()

    assert dom.by_id["run-id"]["text"] == "r1"
    assert kpi("variants") == str(summary.variants) == "8"
    assert kpi("passed") == str(summary.passed) and kpi("rejected") == str(summary.rejected) == "4"
    assert kpi("errors") == "1" and kpi("inputs") == "5"
    assert kpi("pass_rate") == f"{100 * summary.passed / summary.variants:.1f}%"
    # 2. Per recipe rows, compliance per channel, errors grouped by stage.
    recipe_rows = [e for e in dom.having("data-recipe") if e["tag"] == "tr"]
    assert {e["attrs"]["data-recipe"] for e in recipe_rows} == {"marketplace-main", "strict"}
    passed_cells = [e["text"] for e in dom.having("data-col", "passed")]
    assert sorted(passed_cells) == sorted([str(summary.passed), "0"])
    amazon = [e for e in dom.having("data-channel", "amazon_main")]
    assert amazon and all(int(e["attrs"]["data-total"]) == 4 for e in amazon)
    fetch_errors = [e for e in dom.having("data-stage") if e["tag"] == "tr"]
    assert [e["attrs"]["data-stage"] for e in fetch_errors] == ["fetch"] and "MISSING-1" in fetch_errors[0]["text"]
    # 3. Contact sheets: the failing SKU first, every variant tile with its status; thumbnails decode.
    skus = [e["attrs"]["data-sku"] for e in dom.having("data-sku")]
    assert skus[0] == "MISSING-1" and len(skus) == 5
    tiles = dom.having("data-passed")
    assert len(tiles) == 8 and sum(t["attrs"]["data-passed"] == "false" for t in tiles) == summary.rejected
    body = next(e for e in dom.elements if e["tag"] == "body")
    assert int(body["attrs"]["data-images"]) == 8 + 4 and body["attrs"]["data-images-decoded"] == body["attrs"]["data-images"]
    assert len(dom.having("data-score")) >= 3  # histograms

    # 4. A screenshot: a real rendering, not a blank page.
    shot = tmp_path / "report.png"
    done = _chromium(["--window-size=1280,1800", "--hide-scrollbars", f"--screenshot={shot}", url], tmp_path / "profile2")
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), np.float64)
    assert pixels.shape == (1800, 1280) and pixels.std() > 10


def test_figures_streamed_in_small_batches_equal_one_pass(finished_run):
    """The report folds the run in batches; three rows at a time must give the page that one
    batch over the whole run gives, and the figures must match the tables read whole."""
    _, run_dir = finished_run
    whole = gather(str(run_dir), StorageConfig())
    streamed = gather(str(run_dir), StorageConfig(), batch_rows=3)
    assert render(streamed, StorageConfig()) == render(whole, StorageConfig())

    variants = pq.read_table(run_dir / "variants").to_pylist()
    errors = pq.read_table(run_dir / "errors").to_pylist()
    assert streamed.key["variants"] == len(variants) == 8 and streamed.key["errors"] == len(errors) == 1
    assert {n: (r.variants, r.passed) for n, r in streamed.recipes.items()} == {
        n: (sum(v["recipe"] == n for v in variants), sum(v["recipe"] == n and v["passed"] for v in variants)) for n in ("marketplace-main", "strict")
    }
    ciede = np.array([v["score_fidelity_ciede2000"] for v in variants if v["score_fidelity_ciede2000"] is not None], float)
    ciede = ciede[np.isfinite(ciede)]
    hist = streamed.histograms["score_fidelity_ciede2000"]
    assert (hist.lo, hist.hi) == (ciede.min(), ciede.max())
    assert hist.counts.tolist() == np.histogram(ciede, bins=20, range=(ciede.min(), ciede.max()))[0].tolist()
    amazon = streamed.recipes["marketplace-main"].compliance["amazon_main"]
    assert amazon == sum(bool(v["compliance_amazon_main"]) for v in variants if v["recipe"] == "marketplace-main")
    assert streamed.sheets.shown[0] == "MISSING-1" and streamed.sheets.total_skus == 5
    assert [g.stage for g in streamed.error_groups] == ["fetch"] and streamed.error_groups[0].example["sku"] == "MISSING-1"


def test_final_mask_keeps_each_variants_last_attempt():
    import pyarrow as pa

    t = pa.table({
        "sku": ["a", "a", "a", "b", "b", "c"],
        "recipe": ["r", "r", "r", "r", "q", "r"],
        "variant": pa.array([0, 0, 0, 0, 0, 1], pa.int32()),
        "attempt": pa.array([1, 2, 3, 1, 1, None], pa.int32()),  # null: rows from before attempts existed
    })  # fmt: skip
    assert final_mask(t).to_pylist() == [False, False, True, True, True, True]
    # A batch judged against the whole run's retries: rows a and b alone, the retries elsewhere.
    import pyarrow.compute as pc

    from pipelines.report_figures import superseded_keys

    retried = superseded_keys(t.filter(pc.greater(pc.fill_null(t["attempt"], 1), 1)))
    assert final_mask(t.slice(0, 1), retried).to_pylist() == [False] and final_mask(t.slice(3, 1), retried).to_pylist() == [True]
