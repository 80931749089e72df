"""Loading GAN checkpoints (ESRGAN / Real-ESRGAN, LaMa, and every architecture spandrel
detects) and running them over large images in overlapping tiles."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from ops.models import LocalModel, ModelError, ModelInfo
from ops.torch_runtime import Runtime, device_lock, to_tensor, to_uint8

SPANDREL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")

_loaded: dict[tuple, Any] = {}
_lock = threading.Lock()


def check_checkpoint(op_name: str, info: ModelInfo, suffixes: tuple[str, ...]) -> None:
    if info.kind != "checkpoint" or info.suffix not in suffixes:
        what = f"a diffusers {info.class_name} directory" if info.kind == "diffusers" else f"a {info.suffix} file"
        raise ModelError(f"op {op_name!r} needs a checkpoint file ({', '.join(suffixes)}), but model {info.ref!r} is {what}")


def load_spandrel(model: LocalModel, runtime: Runtime, purposes: tuple[str, ...], op_name: str):
    """A spandrel model descriptor on the runtime's device, once per process per model.
    Raises ModelError naming the model when the file is not a checkpoint spandrel knows, or
    when its architecture does something else (an inpainting model given to `upscale`)."""
    key = (model.sha256, runtime.device, str(runtime.dtype))
    with _lock:
        if key in _loaded:
            desc = _loaded[key]
        else:
            from spandrel import ModelLoader

            try:
                desc = ModelLoader(device="cpu").load_from_file(str(model.path))
            except Exception as exc:  # noqa: BLE001 - unknown, truncated or corrupt checkpoints
                raise ModelError(
                    f"model {model.ref!r} (sha256 {model.sha256[:12]}) could not be loaded as a GAN checkpoint: "
                    f"{type(exc).__name__}: {str(exc)[:300]}"
                ) from None
            desc.model.eval()
            desc.to(runtime.device)
            # fp16 where the architecture supports it, else fp32: bf16 is not offered, since
            # some architectures that claim it (LaMa's FFTs) fail in it on CUDA.
            if runtime.on_gpu and runtime.dtype.itemsize == 2 and desc.supports_half:
                desc.half()
            _loaded[key] = desc
    if desc.purpose not in purposes:
        raise ModelError(
            f"op {op_name!r} cannot use model {model.ref!r}: it is a {desc.architecture.name} "
            f"{desc.purpose} model, and this op needs {' or '.join(purposes)}"
        )
    return desc


def model_dtype(desc):
    return next(desc.model.parameters()).dtype


@dataclasses.dataclass(frozen=True)
class Tile:
    row: int  # which image
    y: int
    x: int
    h: int
    w: int


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) tiles of at most `tile` px covering the image, neighbours overlapping by
    `overlap` px; interior and edge tiles have the same size (the last row/column is shifted
    back inside the image), so tiles of one image stack into one batch."""
    th, tw = min(tile, height), min(tile, width)

    def starts(size: int, t: int) -> list[int]:
        if size <= t:
            return [0]
        step = max(1, t - overlap)
        out = list(range(0, size - t, step))
        out.append(size - t)
        return sorted(set(out))

    return [(y, x, th, tw) for y in starts(height, th) for x in starts(width, tw)]


def tile_weight(h: int, w: int, ramp: int) -> np.ndarray:
    """Blend weight for one output tile: a ramp over `ramp` px at each edge, never zero."""
    if ramp <= 0:
        return np.ones((h, w), np.float32)
    wy = np.minimum(np.arange(h) + 1, np.arange(h)[::-1] + 1).clip(max=ramp).astype(np.float32)
    wx = np.minimum(np.arange(w) + 1, np.arange(w)[::-1] + 1).clip(max=ramp).astype(np.float32)
    return np.outer(wy, wx) / float(ramp * ramp)


def run_tiled(desc, images: list[np.ndarray], runtime: Runtime, *, tile: int, overlap: int, tile_batch: int) -> list[np.ndarray]:
    """Super-resolve every image by the model's scale, in overlapping tiles; tiles of the
    same size from all images run together, `tile_batch` per forward pass."""
    scale = int(desc.scale)
    dtype = model_dtype(desc)
    rt = dataclasses.replace(runtime, dtype=dtype)
    tiles: list[Tile] = []
    for i, im in enumerate(images):
        tiles += [Tile(i, y, x, h, w) for (y, x, h, w) in tile_grid(im.shape[0], im.shape[1], tile, overlap)]
    acc = [np.zeros((im.shape[0] * scale, im.shape[1] * scale, 3), np.float32) for im in images]
    wsum = [np.zeros((im.shape[0] * scale, im.shape[1] * scale), np.float32) for im in images]
    by_shape: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        by_shape.setdefault((t.h, t.w), []).append(t)
    for (h, w), group in by_shape.items():
        weight = tile_weight(h * scale, w * scale, overlap * scale // 2)
        for start in range(0, len(group), tile_batch):
            chunk = group[start : start + tile_batch]
            x = to_tensor([images[t.row][t.y : t.y + t.h, t.x : t.x + t.w] for t in chunk], rt)
            with device_lock(id(desc)):
                outs = to_uint8(desc(x))
            for t, out in zip(chunk, outs):
                ys, xs = t.y * scale, t.x * scale
                acc[t.row][ys : ys + out.shape[0], xs : xs + out.shape[1]] += out.astype(np.float32) * weight[..., None]
                wsum[t.row][ys : ys + out.shape[0], xs : xs + out.shape[1]] += weight
    return [np.clip(a / np.maximum(s, 1e-6)[..., None] + 0.5, 0, 255).astype(np.uint8) for a, s in zip(acc, wsum)]
