"""What CLIP similarity + the safety checker cost per variant at real size, by placement.

Builds a CLIP ViT-L/14 (openai/clip-vit-large-patch14's published config) and a Stable
Diffusion safety checker (the same vision tower) with random weights (speed does not depend on
weight values; nothing is downloaded), saves them as a catalog owner would, and loads them
through `QualityModels`, the recipe scorer. Then, in one process, on the same images:

- **finish (baseline)**: one image per call on the CPU, fp32: where `scores:` run by default
  (the CPU stage that finishes each row).
- **pool, CPU**: `score_batch` with `--batch` images per call, fp32 on the CPU: the pool's
  code path where the pool's GPUs are only logical.
- **pool, GPU** (when torch sees CUDA): the same with the scorer declared on a GPU
  (`scores: {resources: {gpus: ...}}`): fp16 on CUDA, as a GPU pool actor runs it.

    python bench/clip_scores.py --images 16 --batch 8 [--json out.json]
    python bench/clip_scores.py --images 256 --gpu-sweep 8 16 32 64 --json out.json   # GPU only

Prints ms per image for each path and the ratio to the baseline. `--gpu-sweep` skips the CPU
paths and times the GPU pool path at each batch size, with FLOPs per image (counted with
torch.utils.flop_counter), TFLOP/s and MFU against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "tests" / "fixtures" / "tiny-clip-tokenizer"


def _vit_l14_config(tokenizer):
    from transformers import CLIPConfig

    # openai/clip-vit-large-patch14: ViT-L/14 at 224 px, a 12-layer 768-wide text tower, 768-d projection.
    text = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
            "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24, "image_size": 224, "patch_size": 14}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)


def build_models(root: Path) -> dict[str, str]:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    processor = CLIPImageProcessor()  # 224 px resize + centre crop, CLIP's mean/std
    torch.manual_seed(0)
    clip, safety = root / "clip-vit-l14", root / "safety-checker"
    CLIPModel(_vit_l14_config(tokenizer)).save_pretrained(str(clip), safe_serialization=True)
    tokenizer.save_pretrained(str(clip))
    processor.save_pretrained(str(clip))
    checker = StableDiffusionSafetyChecker(_vit_l14_config(tokenizer))  # a fresh config: CLIPModel set its attention implementation
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)  # flags nothing; the cost is the same either way
    checker.save_pretrained(str(safety), safe_serialization=True)
    processor.save_pretrained(str(safety))
    return {"clip": str(clip), "safety": str(safety)}


def _images(n: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((size, size * 3 // 4, 3)) * 255).astype(np.uint8) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="images per call on the pool paths")
    ap.add_argument("--size", type=int, default=1600, help="long side of the scored images (the processor resizes to 224)")
    ap.add_argument("--gpu-sweep", type=int, nargs="*", default=None, help="GPU only: time the pool path at each of these batch sizes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="clip-bench-"))
    try:
        gpu_sweep(args, root) if args.gpu_sweep else run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # ~3 GB of fp32 weights


def gpu_sweep(args, root: Path) -> None:
    import torch

    from bench.mfu import count_flops, peak_tflops, utilisation
    from ops.base import Resources
    from ops.quality_models import QualityModels

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-sweep needs a CUDA device")
    models = build_models(root)
    images = _images(args.images, args.size)
    contexts = [{"title": f"Stainless steel water bottle {i}", "attributes": {"color": "blue"}} for i in range(len(images))]
    scorer = QualityModels({**models, "clip_prompt": "{title}, {attributes.color}"}, resources=Resources(cpus=1, gpus=1))
    scorer.score_batch(images[:2], contexts[:2])  # loads and warms up
    name = torch.cuda.get_device_name()
    per_image = count_flops(lambda: scorer.score_batch(images[:8], contexts[:8])) / 8
    out = {"device": name, "images": len(images), "size": args.size, "flops_per_image": int(per_image), "peak_bf16_dense_tflops": peak_tflops(name), "sweep": {}}
    for batch in args.gpu_sweep:
        scorer.score_batch(images[:batch], contexts[:batch])
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(images), batch):
            scorer.score_batch(images[i : i + batch], contexts[i : i + batch])
        torch.cuda.synchronize()
        ips = len(images) / (time.perf_counter() - t)
        out["sweep"][str(batch)] = {"images_per_s": round(ips, 2), "ms_per_image": round(1000 / ips, 3), **utilisation(per_image, ips, name)}
        print(f"clip+safety on {name}, batch {batch}: {out['sweep'][str(batch)]}", flush=True)
    out["best_batch"] = int(max(out["sweep"], key=lambda b: out["sweep"][b]["images_per_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


def run(args, root: Path) -> None:
    import torch

    from ops.base import Resources
    from ops.quality_models import QualityModels

    t0 = time.perf_counter()
    models = build_models(root)
    print(f"built and saved ViT-L/14 CLIP + safety checker in {time.perf_counter() - t0:.0f} s ({root})")
    images = _images(args.images, args.size)
    contexts = [{"title": f"Stainless steel water bottle {i}", "attributes": {"color": "blue"}} for i in range(len(images))]
    config = {**models, "clip_prompt": "{title}, {attributes.color}"}

    def timed(scorer: QualityModels, batch: int) -> float:
        scorer.score_batch(images[:batch], contexts[:batch])  # checks, loads and warms up, as a worker does once
        if scorer.runtime.on_gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, len(images), batch):
            scorer.score_batch(images[i : i + batch], contexts[i : i + batch])
        if scorer.runtime.on_gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(images)

    cpu_threads = max(1, torch.get_num_threads())
    cpu = QualityModels(config, resources=Resources(cpus=cpu_threads))
    results = {"finish (1 image/call, CPU fp32)": timed(cpu, 1), f"pool CPU ({args.batch}/call, fp32)": timed(cpu, args.batch)}
    device = f"{platform.machine()}, {cpu_threads} torch threads"
    if torch.cuda.is_available():
        gpu = QualityModels(config, resources=Resources(cpus=1, gpus=1))
        results[f"pool GPU ({args.batch}/call, fp16)"] = timed(gpu, args.batch)
        results["GPU peak memory GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        device = f"{torch.cuda.get_device_name()} + {device}"
    base = results["finish (1 image/call, CPU fp32)"]
    print(f"device: {device}; {len(images)} images at {args.size} px")
    for name, s in results.items():
        if name.startswith("GPU peak"):
            print(f"{name}: {s}")
        else:
            print(f"{name:34s} {s * 1000:8.1f} ms/image   {base / s:6.2f}x the baseline")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "images": len(images), "batch": args.batch, "s_per_image": results}, indent=2))


if __name__ == "__main__":
    main()
