"""The CLI prints one clear line for user errors, never a traceback."""

from __future__ import annotations

import subprocess
import sys


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_missing_column_is_one_line(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("sku,title\nA,x\n")
    res = _cli("run", "--manifest", str(m), "--recipe", "enhance", "--output", str(tmp_path / "o"))
    assert res.returncode == 2
    assert "no 'image_uri' column" in res.stderr and "Traceback" not in res.stderr + res.stdout
    assert len(res.stderr.strip().splitlines()) <= 3


def test_unknown_recipe_is_one_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"sku": "A", "image_uri": "a.jpg"}\n')
    res = _cli("run", "--manifest", str(m), "--recipe", "nope", "--output", str(tmp_path / "o"))
    assert res.returncode == 2 and "no recipe 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_sample_catalog_writes_manifest_and_truth(tmp_path):
    res = _cli("sample-catalog", "--output", str(tmp_path / "c"), "--count", "3")
    assert res.returncode == 0, res.stderr
    lines = (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert len(list((tmp_path / "c" / "truth").glob("*.mask.png"))) == 3
