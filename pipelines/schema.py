"""The Parquet contract: columns of OUT/RUN/variants/*.parquet and OUT/RUN/errors/*.parquet.

The Finish stage emits one stream with a `kind` column ('variant' or 'error'); the sink
splits it into the two tables with these column lists.
"""

from __future__ import annotations

import pyarrow as pa

from ops.scores import SCORE_NAMES

VARIANT_COLUMNS = [
    ("run_id", pa.string()),
    ("sku", pa.string()),
    ("recipe", pa.string()),
    ("variant", pa.int32()),
    ("segment", pa.string()),  # audience segment id (segment_variants recipes), else null
    ("source_uri", pa.string()),
    ("source_sha256", pa.string()),
    ("output_uri", pa.string()),
    ("output_sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
    ("seed", pa.int64()),
    # Models the variant went through, in step order, and their content hashes.
    ("model", pa.list_(pa.string())),
    ("model_sha256", pa.list_(pa.string())),
    ("recipe_hash", pa.string()),
    ("ops", pa.list_(pa.string())),
    ("passed", pa.bool_()),
    ("reasons", pa.list_(pa.string())),
    ("notes", pa.string()),
    *[(name, pa.float64()) for name in SCORE_NAMES],
    ("phash", pa.string()),
    ("duration_s", pa.float64()),
]

ERROR_COLUMNS = [
    ("run_id", pa.string()),
    ("sku", pa.string()),
    ("recipe", pa.string()),  # null when the input failed before recipes (manifest, fetch, decode)
    ("source_uri", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
]

# Rows after manifest parsing (ParseRows); Fetch adds the bytes and their hash.
PARSED_SCHEMA = pa.schema(
    [
        ("sku", pa.string()),
        ("source_uri", pa.string()),
        ("title", pa.string()),
        ("category", pa.string()),
        ("attributes", pa.string()),
        ("recipes", pa.list_(pa.string())),
        ("overlay_mask_uri", pa.string()),
        ("error", pa.string()),
        ("stage", pa.string()),
        ("error_type", pa.string()),
    ]
)
FETCHED_SCHEMA = PARSED_SCHEMA.append(pa.field("source_bytes", pa.binary())).append(
    pa.field("overlay_bytes", pa.binary())
).append(pa.field("source_sha256", pa.string()))

_merged: dict[str, pa.DataType] = {"kind": pa.string()}
for _name, _type in VARIANT_COLUMNS + ERROR_COLUMNS:
    _merged.setdefault(_name, _type)
OUTPUT_SCHEMA = pa.schema(list(_merged.items()))
VARIANT_SCHEMA = pa.schema(VARIANT_COLUMNS)
ERROR_SCHEMA = pa.schema(ERROR_COLUMNS)
