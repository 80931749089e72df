"""Provenance of generated images: an IPTC/XMP label in the file and an invisible watermark
in the pixels, both readable back by `skustudio verify`.

- XMP: `Iptc4xmpExt:DigitalSourceType = .../trainedAlgorithmicMedia` (what Google Merchant
  and the C2PA/IPTC guidance ask for), plus skustudio's run, sku, recipe and variant.
  Metadata is easy to strip, so:
- Watermark: a 32-bit id (derived from the variant's state key, sku, recipe, variant; stored in the variants
  table as `watermark_id`) plus a 16-bit check, embedded by quantisation-index modulation of
  one mid-frequency DCT coefficient of every 8x8 luma block, each bit repeated over hundreds of
  blocks in a keyed order and read back by majority vote. It survives JPEG re-encoding (tested
  at quality 85) at 45-47 dB PSNR (also read back after quality 75 and 60); it does not survive resizing or cropping (the block grid
  moves), which is the documented limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import zlib

import cv2
import numpy as np

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
_STEP = 24.0  # QIM step on the DCT coefficient: ~3 grey levels of ripple, robust to JPEG q85
_COEF = (2, 1)  # low-mid frequency: JPEG q85 quantises it by ~4, well inside the QIM margin of 6
_BITS = 48  # 32-bit id + 16-bit check
_KEY = 0x5C05_7D10


def watermark_id(state_key: str, sku: str, recipe: str, variant: int) -> int:
    """32-bit id of a variant's content identity (its state key, sku, recipe, variant): a rerun
    that regenerates the same variant writes the same pixels, and the id finds the row."""
    digest = hashlib.sha256(f"{state_key}\x00{sku}\x00{recipe}\x00{variant}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:4], "big")


def _payload(wid: int) -> np.ndarray:
    check = zlib.crc32(wid.to_bytes(4, "big")) & 0xFFFF
    value = (wid << 16) | check
    return np.array([(value >> (_BITS - 1 - i)) & 1 for i in range(_BITS)], np.uint8)


def _block_bits(n_blocks: int) -> np.ndarray:
    """Which payload bit each block carries: a keyed shuffle, so each bit is spread over the
    whole image instead of one region."""
    order = np.random.default_rng(_KEY).permutation(n_blocks)
    return order % _BITS


def _luma_blocks(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    ycc = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    h, w = (image.shape[0] // 8) * 8, (image.shape[1] // 8) * 8
    return ycc, ycc[:h, :w, 0], h // 8, w // 8


_MIN_REPEATS = 4  # each bit in at least this many blocks


def can_carry_watermark(shape: tuple[int, ...]) -> bool:
    """Whether an image of this shape has enough 8x8 blocks for the mark (>= ~100x100 px)."""
    return (shape[0] // 8) * (shape[1] // 8) >= _BITS * _MIN_REPEATS


def embed_watermark(image: np.ndarray, wid: int) -> np.ndarray:
    if not can_carry_watermark(image.shape):
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} image is too small to carry a watermark (check can_carry_watermark first)")
    ycc, y, by, bx = _luma_blocks(image)
    bits = _payload(wid)[_block_bits(by * bx)]
    blocks = y.reshape(by, 8, bx, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    out = np.empty_like(blocks)
    for k, (blk, bit) in enumerate(zip(blocks, bits)):
        d = cv2.dct(blk)
        c = d[_COEF]
        offset = _STEP / 2 if bit else 0.0
        d[_COEF] = np.round((c - offset) / _STEP) * _STEP + offset
        out[k] = cv2.idct(d)
    ycc[: by * 8, : bx * 8, 0] = out.reshape(by, bx, 8, 8).transpose(0, 2, 1, 3).reshape(by * 8, bx * 8)
    return cv2.cvtColor(np.clip(ycc + 0.5, 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)


def read_watermark(image: np.ndarray) -> int | None:
    """The embedded id, or None when there is none (the 16-bit check does not match)."""
    if not can_carry_watermark(image.shape):
        return None
    _, y, by, bx = _luma_blocks(image)
    which = _block_bits(by * bx)
    blocks = y.reshape(by, 8, bx, 8).transpose(0, 2, 1, 3).reshape(-1, 8, 8)
    votes = np.zeros(_BITS)
    for blk, b in zip(blocks, which):
        r = cv2.dct(blk)[_COEF] % _STEP
        votes[b] += 1.0 if abs(r - _STEP / 2) < _STEP / 4 else -1.0
    bits = (votes > 0).astype(np.uint8)
    value = int("".join(map(str, bits)), 2)
    wid, check = value >> 16, value & 0xFFFF
    return wid if (zlib.crc32(wid.to_bytes(4, "big")) & 0xFFFF) == check else None


# ------------------------------------------------------------------------------------ XMP


@dataclasses.dataclass(frozen=True)
class Label:
    run_id: str
    sku: str
    recipe: str
    variant: int
    watermark_id: int | None  # None: the image was too small to carry the mark

    def xmp(self) -> bytes:
        def esc(v) -> str:
            return str(v).replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")

        return (
            '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
            'xmlns:skustudio="https://skustudio.dev/ns/1.0/" '
            f'Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}" '
            f'skustudio:run="{esc(self.run_id)}" skustudio:sku="{esc(self.sku)}" skustudio:recipe="{esc(self.recipe)}" '
            f'skustudio:variant="{self.variant}"'
            + (f' skustudio:watermark="{self.watermark_id:08x}"' if self.watermark_id is not None else "")
            + "/>"
            '</rdf:RDF></x:xmpmeta><?xpacket end="r"?>'
        ).encode("utf-8")


_ATTR = re.compile(r'(Iptc4xmpExt:DigitalSourceType|skustudio:\w+)="([^"]*)"')


def read_xmp(data: bytes) -> dict[str, str]:
    """The provenance attributes of an encoded image's XMP ({} when it has none)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            packet = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp") or b""
    except Exception:  # noqa: BLE001 - not an image: no provenance
        return {}
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else str(packet)
    unescape = {"&amp;": "&", "&lt;": "<", "&quot;": '"'}
    out = {}
    for key, value in _ATTR.findall(text):
        for a, b in unescape.items():
            value = value.replace(a, b)
        out[key] = value
    return out
