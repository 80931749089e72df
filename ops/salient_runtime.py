"""How a salient-object ONNX graph runs: an onnxruntime session, or the same graph converted
to torch (onnx2torch) on CUDA.

One file is the model either way: the recipe's `.onnx` (or the embedded U²-Netp) is read once,
its input and outputs get symbolic dims (batch always; height and width for the fully
convolutional families), and then
- on CPU workers it runs in onnxruntime, one thread (Ray gives each CPU task one core);
- on GPU workers it runs in onnxruntime's CUDA provider when onnxruntime-gpu is installed,
  else as a torch module on the GPU: the torch that the diffusion ops already use, so a GPU
  image needs no second CUDA runtime. It runs in true fp32 there (no TF32, no half precision):
  on 49 real photos an H200 ran it ~50x faster per photo than one CPU thread, bound by the
  host, not the GPU, so lower precision bought nothing, while TF32 moved probabilities by up to
  0.12 (hard-mask IoU down to 0.97 against the CPU path) and fp16 / bf16 by 0.2 / 0.7, enough
  to flip a photo across the confidence gate (docs/benchmarks.md, "GPU segmentation").

A runner takes an N x 3 x H x W float32 batch and returns the graph's first output as float32
numpy; ops/salient_models.py does everything around that (resizing, flips, averaging).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from ops.models import ModelError

log = logging.getLogger(__name__)

Backend = Literal["auto", "onnxruntime", "torch"]
PRECISIONS = ("auto", "fp32", "tf32", "fp16", "bf16")


class GraphRunner(Protocol):
    device: str  # 'cuda' or 'cpu': where the graph's arithmetic happens
    takes_tensors: bool = False  # True: run() also takes a torch tensor on `device`

    def run(self, x) -> np.ndarray: ...


def open_runner(path: Path, *, any_size: bool, device: str, backend: Backend = "auto", precision: str = "auto") -> GraphRunner:
    """The runner for one model file. `device` is where the op was placed ('cuda' on a GPU
    worker); `backend` forces one engine (tests compare them on CPU)."""
    graph = read_graph(path, any_size=any_size)
    if backend == "torch":
        return TorchRunner(graph, path, device=device, precision=precision)
    if backend == "auto" and device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            if _torch_cuda():
                return TorchRunner(graph, path, device="cuda", precision=precision)
            log.warning("remove_background on a GPU worker, but neither onnxruntime (install onnxruntime-gpu) nor torch sees CUDA; running on the CPU")
            device = "cpu"
    return OrtRunner(graph, path, device=device)


def read_graph(path: Path, *, any_size: bool):
    """The ONNX model with symbolic batch (and, for any-size families, height/width) dims on its
    input and outputs. Raises ModelError naming the file when it is not a one-image-input graph."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise ModelError(f"model {str(path)!r} is not a readable ONNX file ({exc}); check the file or re-export it") from None
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise ModelError(f"model {str(path)!r}: expected one image input of shape N x 3 x H x W, found {[i.name for i in inputs]}")
    for tensor in [inputs[0], *model.graph.output]:
        dims = tensor.type.tensor_type.shape.dim
        names = ["batch", None, "height", "width"] if any_size else ["batch", None, None, None]
        for k, name in enumerate(names[: len(dims)]):
            if name:
                dims[k].dim_param = name
    return model


class OrtRunner:
    """An onnxruntime session; CUDA when the provider is there and the op is on a GPU worker."""

    def __init__(self, graph, path: Path, *, device: str, cpu_threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # Ray gives each CPU task one core; onnxruntime's own pool would oversubscribe it.
        # (0 = onnxruntime's default, one per core: the benchmarks' reference maps.)
        opts.intra_op_num_threads = cpu_threads if device == "cpu" else 0
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(graph.SerializeToString(), opts, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"model {str(path)!r}: onnxruntime cannot load it ({exc}); check the export's opset") from None
        self._input = self._session.get_inputs()[0].name
        self.device = "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._session.run(None, {self._input: x})[0], np.float32)


class TorchRunner:
    """The graph as a torch module (onnx2torch), cuDNN autotuned per input shape (a recipe has
    at most a few pass sizes). `precision`: fp32 (the default: IEEE fp32 convolutions, as the
    CPU path computes), tf32, fp16 or bf16 (autocast); the others are for benchmarks.
    It takes its input as a tensor already on its device (ops/salient_frames.py makes the
    frames there) or as numpy."""

    takes_tensors = True

    def __init__(self, graph, path: Path, *, device: str, precision: str = "auto"):
        import torch

        try:
            from onnx2torch import convert
        except ImportError:
            raise ModelError("remove_background on torch needs the onnx2torch package; run `pip install onnx2torch`") from None
        try:
            module = convert(graph)
        except Exception as exc:  # noqa: BLE001 - an op onnx2torch lacks, a malformed graph
            raise ModelError(f"model {str(path)!r}: cannot run it on torch ({exc}); install onnxruntime-gpu for GPU workers instead") from None
        # onnx2torch's Slice indexes with a list, which torch 2.x warns about on every call.
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        self.device = device
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self._tf32 = precision == "tf32"
        self._module = module.eval().to(device)
        self._torch = torch

    def run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        # cuDNN's flags are process-wide and the diffusion ops sharing this GPU worker turn TF32
        # on; they are set for this call only.
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=True, allow_tf32=self._tf32):
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(x).to(self.device, non_blocking=True)
            with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = self._module(t)
            first = out[0] if isinstance(out, (list, tuple)) else out
            return first.float().cpu().numpy()


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
