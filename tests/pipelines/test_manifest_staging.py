"""CSV, Parquet and gzipped manifests are streamed into a JSONL copy that every pass reads in
byte ranges; the copy must give exactly the rows (and error rows) the file gives read whole."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math

import boto3
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipelines.manifest import _parse_jsonl_lines, check_columns, normalise_row, reads_in_ranges
from pipelines.manifest_staging import STAGED, stage_manifest, write_jsonl_copy
from pipelines.storage import StorageConfig, StreamingUpload

RECIPES = ["enhance", "marketplace-main"]
ROWS = [
    {"sku": "A-1", "image_uri": "/img/a.jpg", "title": 'Mug, "large", blue', "category": "kitchen", "attributes": '{"colour": "blue"}', "recipes": "enhance"},
    {"sku": "B-2", "image_uri": "/img/b.jpg", "title": "Zweiter Stuhl — Eiche\nmit Kissen", "category": "", "attributes": "", "recipes": ""},
    {"sku": "", "image_uri": "/img/c.jpg", "title": "no sku", "category": "", "attributes": "{}", "recipes": ""},
    {"sku": "D-4", "image_uri": "ftp://x/d.jpg", "title": "bad scheme", "category": "", "attributes": "{}", "recipes": ""},
    {"sku": "E-5", "image_uri": "/img/e.jpg", "title": "bad attrs", "category": "", "attributes": "{not json", "recipes": ""},
    {"sku": "F-6", "image_uri": "/img/f.jpg", "title": "unknown recipe", "category": "", "attributes": "{}", "recipes": "enhance;nope"},
]


def parsed(lines: list[str]) -> list[dict]:
    return [normalise_row(r, RECIPES) for r in _parse_jsonl_lines(pa.table({"text": pa.array(lines, pa.string())})).to_pylist()]


def without_echo(row: dict) -> dict:
    return {**row, "error": row["error"] and row["error"].split(" (row: ")[0]}


def via_copy(tmp_path, uri: str) -> list[dict]:
    dest = tmp_path / "copy.jsonl"
    write_jsonl_copy(uri, StorageConfig(), str(dest), check_columns(uri, StorageConfig()))
    return parsed(dest.read_text("utf-8").splitlines())


def write_csv(path, rows, opener=open):
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("gz", [False, True])
def test_a_csv_copy_gives_the_rows_the_csv_gives(tmp_path, gz):
    path = tmp_path / ("m.csv.gz" if gz else "m.csv")
    write_csv(path, ROWS, gzip.open if gz else open)
    # The whole-file reader as it was: every cell as text.
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in ROWS[0]})
    whole = [normalise_row(r, RECIPES) for r in pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True), convert_options=convert).to_pylist()]
    copied = via_copy(tmp_path, str(path))
    assert copied == whole
    assert [r["error"] is None for r in copied] == [True, True, False, False, False, False]
    assert copied[0]["title"] == 'Mug, "large", blue' and copied[1]["title"] == "Zweiter Stuhl — Eiche\nmit Kissen"


def test_a_parquet_copy_gives_the_rows_the_parquet_gives(tmp_path):
    n = len(ROWS)
    table = pa.table(
        {
            "sku": [r["sku"] for r in ROWS],
            "image_uri": pa.array([r["image_uri"].encode() for r in ROWS], pa.binary()),  # bytes, read as UTF-8
            "title": pa.array([r["title"] if i % 2 else None for i, r in enumerate(ROWS)], pa.string()),
            "attributes": pa.array([[("colour", "blue"), ("size", str(i))] for i in range(n)], pa.map_(pa.string(), pa.string())),
            "recipes": pa.array([["enhance"], None, [], ["marketplace-main"], ["enhance", "marketplace-main"], ["nope"]], pa.list_(pa.string())),
            "category": pa.array([1.5, math.nan, None, 2.0, 3.0, 4.0], pa.float64()),  # not text: str() as before
            "extra": list(range(n)),  # not a manifest column: left out
        }
    )
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=4)
    wanted = [c for c in table.column_names if c != "extra"]
    whole = [normalise_row(r, RECIPES) for r in pq.read_table(tmp_path / "m.parquet", columns=wanted).to_pylist()]
    copied = via_copy(tmp_path, str(tmp_path / "m.parquet"))
    # The same rows; an error's echo of its row prints binary cells as text now, not b'...'.
    assert [without_echo(r) for r in copied] == [without_echo(r) for r in whole]
    assert "b'/img/c.jpg'" in whole[2]["error"] and '"image_uri": "/img/c.jpg"' in copied[2]["error"]
    assert copied[0]["attributes"] == json.dumps({"colour": "blue", "size": "0"}, sort_keys=True) and copied[0]["source_uri"] == "/img/a.jpg"
    assert "nope" in copied[5]["error"]


def test_a_gzipped_jsonl_copy_keeps_every_line_and_its_bad_ones(tmp_path):
    lines = [json.dumps(r) for r in ROWS] + ["{broken", "", json.dumps({"sku": "Z", "image_uri": "/z.jpg"})]
    path = tmp_path / "m.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))  # no final newline
    assert via_copy(tmp_path, str(path)) == parsed(lines)
    assert sum("not valid JSON" in (r["error"] or "") for r in parsed(lines)) == 1


def test_a_malformed_csv_line_is_one_error_row_and_a_bad_byte_one_odd_title(tmp_path):
    good = "\n".join(f"S-{i},/img/{i}.jpg,title {i}" for i in range(5))
    text = f"sku,image_uri,title\n{good}\nS-X,/img/x.jpg,a title, with a comma\n".encode() + b"S-Y,/img/y.jpg,caf\xe9\n"
    (tmp_path / "m.csv").write_bytes(text)
    # The whole-file reader failed the entire read on either line.
    with pytest.raises(pa.ArrowInvalid):
        pacsv.read_csv(io.BytesIO(text), convert_options=pacsv.ConvertOptions(column_types={"title": pa.string()}))
    rows = via_copy(tmp_path, str(tmp_path / "m.csv"))
    assert [r["sku"] for r in rows if not r["error"]] == [f"S-{i}" for i in range(5)] + ["S-Y"]
    assert next(r for r in rows if r["sku"] == "S-Y")["title"] == "caf\ufffd"
    (bad,) = [r for r in rows if r["error"]]
    assert "CSV line has 4 fields where the header has 3" in bad["error"] and "S-X" in bad["error"], bad["error"]


def test_a_streamed_upload_to_s3_is_whole_encrypted_and_all_or_nothing(s3_endpoint, bucket):
    storage = StorageConfig(endpoint_url=s3_endpoint, region="us-east-1", sse="AES256")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    data = bytes(range(256)) * (80_000)  # 20 MB: three parts of 8 MiB or less
    with StreamingUpload(f"s3://{bucket}/copy.bin", storage) as out:
        for i in range(0, len(data), 3_000_001):
            out.write(data[i : i + 3_000_001])
    got = client.get_object(Bucket=bucket, Key="copy.bin")
    assert got["Body"].read() == data and got["ServerSideEncryption"] == "AES256"
    with pytest.raises(RuntimeError):
        with StreamingUpload(f"s3://{bucket}/half.bin", storage) as out:
            out.write(data)
            raise RuntimeError("the source failed half way")
    assert "Contents" not in client.list_objects_v2(Bucket=bucket, Prefix="half")
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_stage_manifest_copies_once_per_source_and_leaves_jsonl_as_it_is(ray_session, s3_endpoint, bucket, tmp_path, caplog):
    storage = StorageConfig(endpoint_url=s3_endpoint, region="us-east-1")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    local = tmp_path / "m.csv"
    write_csv(local, ROWS)
    client.upload_file(str(local), bucket, "in/m.csv")
    uri, run_prefix = f"s3://{bucket}/in/m.csv", f"s3://{bucket}/out/run-1"
    columns = check_columns(uri, storage)
    staged = stage_manifest(uri, storage, run_prefix, columns)
    assert staged.startswith(f"{run_prefix}/{STAGED}/") and reads_in_ranges(staged, storage)
    body = client.get_object(Bucket=bucket, Key=staged.removeprefix(f"s3://{bucket}/"))["Body"].read().decode()
    assert parsed(body.splitlines()) == via_copy(tmp_path, str(local))
    # A second attempt of the run reuses the copy; a changed source gets a new one.
    with caplog.at_level(logging.INFO, logger="pipelines.manifest_staging"):
        assert stage_manifest(uri, storage, run_prefix, columns) == staged
    assert "an earlier attempt wrote" in caplog.text
    write_csv(local, ROWS[:2])
    client.upload_file(str(local), bucket, "in/m.csv")
    assert stage_manifest(uri, storage, run_prefix, columns) != staged
    # A JSONL manifest is read in place.
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    assert stage_manifest(str(jsonl), StorageConfig(), str(tmp_path / "out"), ["sku", "image_uri"]) == str(jsonl)
