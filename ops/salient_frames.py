"""A segmentation model's input frame: the photo resized to the pass's square side and
normalised as the rembg exports expect.

On a CPU worker that is `cv2.resize` and a few numpy steps (`host_frame`). On a GPU worker
the same arithmetic runs on the GPU (`DeviceFrames`): the photo goes up once as uint8 and each
side's frame is two small matrix products with OpenCV's own INTER_AREA weights, rounded to
8 bits as OpenCV rounds. A GPU worker spent about a third of its host CPU per photo on these
resizes (7 ms a frame for a 2 MP photo, ~4 frames for an escalated photo), while the GPU,
which runs the model ~50x faster than one CPU thread, sat mostly idle (docs/benchmarks.md).

Only shrinking in both directions takes the device path. OpenCV enlarges (and shrinks one
axis while enlarging the other) with fixed-point bilinear weights that a float product would
match only to a level; those photos, smaller than the frame, are cheap to resize on the host.
"""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np


def host_frame(image: np.ndarray, size: int, mean, std) -> np.ndarray:
    """3 x size x size float32: the photo resized (INTER_AREA when shrinking), scaled by its own
    maximum (what rembg does before the mean/std, and what these exports saw), normalised."""
    h, w = image.shape[:2]
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    im = cv2.resize(image, (size, size), interpolation=interp).astype(np.float32)
    im *= 1.0 / max(float(im.max()), 1.0)
    im -= np.asarray(mean, np.float32)
    im /= np.asarray(std, np.float32)
    return np.ascontiguousarray(im.transpose(2, 0, 1))


def area_weights(src: int, dst: int) -> np.ndarray:
    """dst x src float64 matrix W with W @ line == OpenCV's INTER_AREA shrink of `line` (before
    rounding): each output pixel is the mean of the source span it covers, partial pixels at
    the span's ends weighted by their overlap (OpenCV's computeResizeAreaTab, tolerance
    included)."""
    if dst > src:
        raise ValueError(f"area_weights shrinks only: {src} -> {dst} px enlarges; resize on the host")
    scale = src / dst
    w = np.zeros((dst, src), np.float64)
    for dx in range(dst):
        f1 = dx * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1 = min(math.ceil(f1), src - 1)
        s2 = min(math.floor(f2), src - 1)
        s1 = min(s1, s2)
        if s1 - f1 > 1e-3:
            w[dx, s1 - 1] = (s1 - f1) / cell
        w[dx, s1:s2] = 1.0 / cell
        if f2 - s2 > 1e-3:
            w[dx, s2] = min(min(f2 - s2, 1.0), cell) / cell
    return w


class DeviceFrames:
    """Input frames computed on a torch device. One instance per model; the weight matrices
    are kept per (source side, frame side) pair, a handful per catalog."""

    def __init__(self, device: str, mean, std):
        import torch

        self._torch = torch
        self.device = device
        self._host_norm = (tuple(mean), tuple(std))  # for photos smaller than a frame
        self._mean = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
        self._weights: dict[tuple[int, int], object] = {}
        # Decoded photos can be read-only arrays; the upload copies them and never writes.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

    def upload(self, image: np.ndarray):
        """The photo on the device, 3 x H x W float64 (exact for 8-bit values; float64 also keeps
        the products off TF32, which the diffusion ops on the same worker switch on)."""
        t = self._torch.from_numpy(np.ascontiguousarray(image)).to(self.device, non_blocking=False)
        return t.permute(2, 0, 1).to(self._torch.float64)

    def frame(self, image: np.ndarray, uploaded, size: int):
        """3 x size x size float32 on the device, equal to `host_frame` up to OpenCV's rounding of
        halves (a level on a few pixels). `uploaded` is `upload(image)`, shared by a photo's sizes."""
        torch = self._torch
        h, w = image.shape[:2]
        if h < size or w < size:
            return torch.from_numpy(host_frame(image, size, *self._host_norm)).to(self.device)
        # rembg's normalisation: by the frame's own maximum, then the family's mean and std.
        x = self.resized(uploaded, size).to(torch.float32)
        x *= 1.0 / x.amax().clamp(min=1.0)
        return (x - self._mean) / self._std

    def resized(self, uploaded, size: int):
        """3 x size x size: OpenCV's INTER_AREA shrink of an uploaded photo, rounded to 8-bit
        values as cv2.resize returns them (round half to even), as float64."""
        h, w = uploaded.shape[1:]
        x = self._torch.matmul(self._torch.matmul(self._weight(h, size), uploaded), self._weight(w, size).T)
        return x.round_().clamp_(0, 255)

    def mirrored(self, frame):
        return frame.flip(-1)

    def stack(self, frames: list):
        return self._torch.stack(frames)

    def _weight(self, src: int, dst: int):
        key = (src, dst)
        if key not in self._weights:
            self._weights[key] = self._torch.from_numpy(area_weights(src, dst)).to(self.device)
        return self._weights[key]
