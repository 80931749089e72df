"""The salient-object graph on torch (ops/salient_runtime.py): the path a GPU worker takes when
onnxruntime has no CUDA provider. Here it runs on the CPU, where it must give what onnxruntime
gives from the same ONNX file; the GPU numbers are in docs/benchmarks.md ("GPU segmentation")."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from onnx import TensorProto, helper

from ops import salient_runtime
from ops.matte import fuse, mask_confidence
from ops.metrics import iou
from ops.models import ModelError, builtin_path
from ops.salient_models import Pass, SalientModel
from pipelines.sample_catalog import render_product
from tests.conftest import SHARED
from tests.tiny_models import save_tiny_salient_onnx


def _photos() -> list[np.ndarray]:
    """Two synthetic scenes, and one real product photo where ../shared is present."""
    out = [render_product(s, background="cluttered", degradation="none", size=(420, 360)).photo for s in (0, 3)]
    real = sorted((SHARED / "photos").glob("dreambooth__*.jpg")) if (SHARED / "photos").is_dir() else []
    if real:
        from PIL import Image

        out.append(np.asarray(Image.open(real[0]).convert("RGB")))
    return out


def test_the_embedded_model_on_torch_gives_onnxruntimes_masks():
    path, _ = builtin_path("builtin:u2netp")
    ort = SalientModel(path, "u2netp")
    torch_model = SalientModel(path, "u2netp", backend="torch")
    assert ort.device == torch_model.device == "cpu"
    # The first look and a mirrored look at another size: the graph's resizes follow the input.
    passes = [Pass(320), Pass(384, flip=True)]
    for photo in _photos():
        a, b = ort.predict([photo], passes, 320)[0], torch_model.predict([photo], passes, 320)[0]
        for pa, pb in zip(a, b):
            assert np.abs(pa - pb).max() < 1e-3
        fa, fb = fuse(a), fuse(b)
        assert iou(fa > 0.5, fb > 0.5) > 0.999
        assert abs(mask_confidence(fa) - mask_confidence(fb)) < 1e-3


@pytest.mark.parametrize("family", ["u2netp", "birefnet-general-lite"])
def test_families_batch_on_torch_as_on_onnxruntime(family, tmp_path):
    # A fixed 1x3xSxS export, made dynamic, fed three images at two sizes in shared calls;
    # BiRefNet's graph gives logits, which the model turns into probabilities either way.
    path = save_tiny_salient_onnx(tmp_path / f"{family}.onnx", family)
    renders = [render_product(s, background="plain", degradation="none", size=(200, 240)) for s in range(3)]
    images = [np.where(r.mask[..., None] > 0, r.clean, 255).astype(np.uint8) for r in renders]  # on white
    onnxruntime = SalientModel(path, family, max_batch=4)
    side = onnxruntime.sizes_for((1.0,))[0]
    passes = [Pass(side), Pass(side, flip=True)]
    got = SalientModel(path, family, backend="torch", max_batch=4).predict(images, passes, 160)
    want = onnxruntime.predict(images, passes, 160)
    for g, w in zip(got, want):
        for pg, pw in zip(g, w):
            assert pg.shape == pw.shape == (160, 160)
            assert np.abs(pg - pw).max() < 1e-4
            assert 0.05 < (pg > 0.5).mean() < 0.95  # a product and a backdrop, not a flat map


def test_a_gpu_worker_without_cuda_runs_on_the_cpu_and_says_why(tmp_path, monkeypatch, caplog):
    path = save_tiny_salient_onnx(tmp_path / "u2netp.onnx")
    monkeypatch.setattr(salient_runtime, "_torch_cuda", lambda: False)
    with caplog.at_level(logging.WARNING, logger="ops.salient_runtime"):
        model = SalientModel(path, "u2netp", device="cuda")
    assert model.device == "cpu" and isinstance(model._runner, salient_runtime.OrtRunner)
    assert "install onnxruntime-gpu" in caplog.text


def test_a_gpu_worker_with_torch_cuda_takes_the_torch_graph(tmp_path, monkeypatch):
    # Which engine a GPU worker gets, when onnxruntime has no CUDA provider but torch sees a GPU.
    path = save_tiny_salient_onnx(tmp_path / "u2netp.onnx")
    monkeypatch.setattr(salient_runtime, "_torch_cuda", lambda: True)
    chosen = {}

    class Recorder(salient_runtime.TorchRunner):
        def __init__(self, graph, path, *, device, precision="auto"):
            chosen.update(device=device, precision=precision)
            super().__init__(graph, path, device="cpu", precision=precision)

    monkeypatch.setattr(salient_runtime, "TorchRunner", Recorder)
    SalientModel(path, "u2netp", device="cuda")
    assert chosen == {"device": "cuda", "precision": "auto"}


def test_a_graph_torch_cannot_run_is_a_model_error_naming_the_file(tmp_path):
    node = helper.make_node("NoSuchOp", ["input.1"], ["out"], domain="example.custom")
    graph = helper.make_graph(
        [node], "odd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11), helper.make_opsetid("example.custom", 1)])
    path = tmp_path / "u2netp-odd.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=r"u2netp-odd\.onnx.*cannot run it on torch.*onnxruntime-gpu"):
        SalientModel(path, "u2netp", backend="torch")


def test_an_unknown_precision_names_the_choices(tmp_path):
    path = save_tiny_salient_onnx(tmp_path / "u2netp.onnx")
    with pytest.raises(ValueError, match=r"precision 'fp8'.*fp32, tf32, fp16, bf16"):
        SalientModel(path, "u2netp", backend="torch", precision="fp8")


def test_frames_made_on_the_device_are_opencvs_resize():
    # A GPU worker makes the model's input frames on the GPU (ops/salient_frames.py). Against
    # cv2.resize's INTER_AREA: within one 8-bit level, on under 1% of the pixels (OpenCV rounds
    # its float sums; measured 0.11% on real photos); photos smaller than a frame take the host
    # path and are the same bit for bit.
    import cv2

    from ops.salient_frames import DeviceFrames, area_weights, host_frame
    from ops.salient_models import IMAGENET_MEAN, IMAGENET_STD

    rng = np.random.default_rng(7)
    photos = _photos() + [
        render_product(1, background="cluttered", degradation="noise", size=(1280, 1280)).photo,  # 4x: OpenCV's integer path
        rng.integers(0, 256, (977, 1403, 3), dtype=np.uint8),  # noise: every rounding case
        rng.integers(0, 256, (300, 700, 3), dtype=np.uint8),  # narrower than a frame
    ]
    frames = DeviceFrames("cpu", IMAGENET_MEAN, IMAGENET_STD)
    off = total = 0
    for photo in photos:
        uploaded = frames.upload(photo)
        for size in (256, 320, 384):
            want = host_frame(photo, size, IMAGENET_MEAN, IMAGENET_STD)
            got = frames.frame(photo, uploaded, size).numpy()
            assert got.shape == want.shape == (3, size, size) and got.dtype == np.float32
            if min(photo.shape[:2]) < size:
                assert np.array_equal(got, want)
                continue
            levels = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA).transpose(2, 0, 1).astype(int)
            diff = np.abs(frames.resized(uploaded, size).numpy().astype(int) - levels)
            assert diff.max() <= 1
            off, total = off + int((diff > 0).sum()), total + diff.size
            # A level, after the normalisation by the frame's maximum and the std.
            level = 1.0 / (max(levels.max() - 1, 1) * min(IMAGENET_STD))
            assert np.abs(got - want).max() < level + 1e-5
    assert total and off / total < 0.01
    for src, dst in ((1403, 320), (1280, 320), (320, 320), (333, 320)):
        w = area_weights(src, dst)
        assert np.allclose(w.sum(axis=1), 1.0) and np.allclose(w.sum(axis=0), dst / src)


def test_a_torch_runner_makes_each_photos_frames_once_per_size():
    # Every pass at a size reads one frame, mirrored or not; each photo is uploaded once.
    path, _ = builtin_path("builtin:u2netp")
    model = SalientModel(path, "u2netp", backend="torch")
    uploads, made = [], []
    upload, frame = model._device_frames.upload, model._device_frames.frame
    model._device_frames.upload = lambda image: uploads.append(1) or upload(image)
    model._device_frames.frame = lambda image, up, size: made.append(size) or frame(image, up, size)
    photos = [render_product(s, background="cluttered", degradation="none", size=(500, 420)).photo for s in range(2)]
    passes = [Pass(256), Pass(256, flip=True), Pass(320), Pass(320, flip=True)]
    maps = model.predict(photos, passes, 320)
    assert len(uploads) == 2 and sorted(made) == [256, 256, 320, 320]
    want = SalientModel(path, "u2netp").predict(photos, passes, 320)  # onnxruntime, host frames
    for got_maps, want_maps in zip(maps, want):
        for g, w in zip(got_maps, want_maps):
            assert np.abs(g - w).max() < 2e-3
