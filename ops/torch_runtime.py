"""Where and how torch models run: device, dtype, and the inference settings GPU ops share.

On CUDA: half precision (bf16 where supported, else fp16), channels_last, TF32 matmuls,
SDPA attention (diffusers' default processor on torch 2), optional `torch.compile`. On CPU
(tests, laptops, clusters whose GPUs are only logical): fp32 and the same code path.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Literal

import numpy as np

Device = Literal["auto", "cuda", "cpu"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: str  # 'cuda' or 'cpu'
    dtype: object  # torch.dtype

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


def pick_runtime(device: Device = "auto", precision: Precision = "auto", *, cpu_threads: float = 1.0) -> Runtime:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device on this worker; use device: auto")
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    if precision == "auto":
        dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev == "cuda" else torch.float32
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dev == "cpu":
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs the op declared.
        torch.set_num_threads(max(1, int(cpu_threads)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return Runtime(device=dev, dtype=dtype)


def generators(seeds, device: str):
    """One torch.Generator per row, so a row's noise depends on its seed alone, not on which
    rows share its batch."""
    import torch

    return [torch.Generator(device=device).manual_seed(int(s) & 0x7FFF_FFFF_FFFF_FFFF) for s in seeds]


def to_tensor(images: list[np.ndarray], runtime: Runtime):
    """HxWx3 uint8 RGB arrays (same size) -> Bx3xHxW float in [0, 1] on the runtime device."""
    import torch

    arr = np.stack(images).astype(np.float32) / 255.0
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return t.to(runtime.device, runtime.dtype)


def to_uint8(t) -> list[np.ndarray]:
    """Bx3xHxW float in [0, 1] -> HxWx3 uint8 arrays."""
    arr = t.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


_locks: dict[object, threading.Lock] = {}
_locks_guard = threading.Lock()


def device_lock(key: object) -> threading.Lock:
    """One lock per loaded model. GPU workers run two batches at once so one batch's CPU work
    (decode-side prep, paste-back) overlaps the other's GPU work; the model itself (and a
    diffusers scheduler's per-call state) is used by one thread at a time."""
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def staged_tensor(arrays: list[np.ndarray], runtime: Runtime):
    """N HxWxC (or HxW) uint8 arrays of one size -> NxCxHxW float32 in [0, 1] on the runtime's
    device. Stacked as uint8 on the CPU (a quarter of float32's bytes), copied through pinned
    memory without blocking, converted on the device, channels_last like the models' weights.
    Values and layout equal diffusers' own PIL preprocessing, so outputs are bit-identical."""
    import torch

    t = torch.from_numpy(np.stack(arrays))
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if runtime.on_gpu:
        t = t.pin_memory().to(runtime.device, non_blocking=True)
    # A 256-entry table of numpy's x / 255 in float32 (torch divides by a scalar as a multiply
    # by its reciprocal, an ulp off for some values), and NHWC memory seen as NCHW: the
    # strides diffusers' numpy_to_pt gives, which the convolutions' arithmetic depends on.
    return _unit_lut(t.device)[t.long()].permute(0, 3, 1, 2)


_luts: dict[str, object] = {}


def _unit_lut(device):
    import torch

    key = str(device)
    if key not in _luts:
        _luts[key] = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(255.0)).to(device)
    return _luts[key]


class HostCopy:
    """A pipeline's NxCxHxW output in [0, 1] (any dtype, any device) -> HxWxC uint8 arrays,
    rounded as x*255+0.5 in float32 on the device; started now, waited for with `wait()`.
    On CUDA the conversion and the copy into pinned memory are queued behind the model's
    kernels and an event marks their end, so the caller can release the model's lock first:
    another thread's batch then queues its kernels while this one waits for its own copy
    (not for the whole stream)."""

    def __init__(self, images):
        import torch

        out = (images.float() * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        self.event = None
        if out.is_cuda:
            self.host = torch.empty(out.shape, dtype=torch.uint8, pin_memory=True)
            self.host.copy_(out, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = out.contiguous()

    def wait(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return list(self.host.numpy())


DEFAULT_COMPILE_CACHE = "~/.cache/skustudio/compile"


def use_compile_cache() -> str:
    """Point Inductor (and Triton) at a node-local, persistent cache, so a compiled graph is
    built once per node and later actors and nightly runs load it instead of recompiling.
    `$SKUSTUDIO_COMPILE_CACHE` overrides the place (mount a node-local volume there on
    clusters). Without it, TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR settings are kept."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("SKUSTUDIO_COMPILE_CACHE", DEFAULT_COMPILE_CACHE)).expanduser()
    # torch writes its own default into TORCHINDUCTOR_CACHE_DIR the first time it looks, so
    # an existing value is only kept when no SKUSTUDIO_COMPILE_CACHE was asked for.
    for var, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        if "SKUSTUDIO_COMPILE_CACHE" in os.environ or var not in os.environ:
            os.environ[var] = str(root / sub)
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    try:
        import torch._inductor.config as inductor

        inductor.fx_graph_cache = True
    except Exception:  # noqa: BLE001 - an older torch without the knob: the env vars still apply
        pass
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]
