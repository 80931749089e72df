"""`skustudio verify`: where did this image come from?

Reads the file's XMP label (IPTC DigitalSourceType, skustudio run/sku/recipe/variant) and its
invisible watermark id, and, given the output prefix, finds the variant row with that id in
the last committed run's table (the watermark outlives stripped metadata)."""

from __future__ import annotations

import dataclasses

import pyarrow.compute as pc
import pyarrow.dataset as pads

from ops.codec import decode_image
from ops.provenance import DIGITAL_SOURCE_TYPE, read_watermark, read_xmp
from pipelines.state import latest_run
from pipelines.storage import StorageConfig, arrow_filesystem, join, read_bytes


@dataclasses.dataclass
class Provenance:
    uri: str
    ai_labelled: bool
    label: dict[str, str]
    watermark_id: str | None
    row: dict | None  # the variant row the watermark maps to, when an output prefix was given

    @property
    def found(self) -> bool:
        return bool(self.label) or self.watermark_id is not None

    def describe(self) -> str:
        if not self.found:
            return f"{self.uri}: no skustudio provenance found (no XMP label, no watermark)"
        parts = [f"{self.uri}:"]
        if self.ai_labelled:
            parts.append("AI-generated (IPTC DigitalSourceType trainedAlgorithmicMedia);")
        if self.label:
            parts.append(f"label: run {self.label.get('skustudio:run')}, sku {self.label.get('skustudio:sku')!r}, "
                         f"recipe {self.label.get('skustudio:recipe')}, variant {self.label.get('skustudio:variant')};")  # fmt: skip
        else:
            parts.append("no XMP label (stripped?);")
        parts.append(f"watermark {self.watermark_id}" if self.watermark_id else "no watermark")
        if self.row:
            r = self.row
            parts.append(f"-> variant row: run {r['run_id']}, sku {r['sku']!r}, recipe {r['recipe']}, variant {r['variant']}, {r['output_uri']}")
        return " ".join(parts)


def verify(uri: str, storage: StorageConfig, output: str | None = None) -> Provenance:
    data = read_bytes(uri, storage)
    label = read_xmp(data)
    wid = read_watermark(decode_image(data).image)
    found = Provenance(
        uri=uri,
        ai_labelled=label.get("Iptc4xmpExt:DigitalSourceType") == DIGITAL_SOURCE_TYPE,
        label={k: v for k, v in label.items() if k.startswith("skustudio:")},
        watermark_id=f"{wid:08x}" if wid is not None else None,
        row=None,
    )
    if output and found.watermark_id:
        found.row = lookup(output, found.watermark_id, storage)
    return found


def lookup(output: str, wid: str, storage: StorageConfig) -> dict | None:
    run = latest_run(output, storage)
    if run is None:
        return None
    fs, path = arrow_filesystem(join(output, run, "variants"), storage)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table(
        columns=["run_id", "sku", "recipe", "variant", "output_uri", "watermark_id", "reused_from"], filter=pc.field("watermark_id") == wid
    )
    rows = table.to_pylist()
    return rows[0] if rows else None
