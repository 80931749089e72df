"""The `scene` op at 512x512, 20 steps: skustudio (the op alone, and the whole Ray Data
pipeline) vs plain diffusers loops doing the same work with the same settings, eager and
compiled, and vs the default loop most users would write (fp16, batch 1). Same device, same
process run.

On CUDA it builds a real-size Stable Diffusion 1.5 inpainting architecture from the published
config with random weights (speed does not depend on the weights; nothing is downloaded).
On a CPU machine it runs the tiny test model instead, and says so.

    python bench/gpu_scene.py --images 48 --sweep 4 8 16 32 --json out.json   # GPU machine
    python bench/gpu_scene.py --images 6 --sweep 1 3 --steps 4                 # CPU: tiny model

1. FLOPs per image, counted with torch.utils.flop_counter on the exact calls (the UNet at
   2x the batch for classifier-free guidance, the text encoder and the VAE).
2. A batch-size sweep of the plain eager loop: images/s, TFLOP/s and MFU (UNet FLOPs against
   the device's dense bf16 peak) per batch; the best batch runs every later path.
3. Plain loop compiled (torch.compile of the UNet, static shapes), the skustudio op compiled
   (its default on CUDA) and eager, timed alternately with the plain loops.
4. The whole pipeline on local Ray (compiled): steady-state images/s, seconds to the first
   image, and the CPU phases' measured seconds per row beside the model's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "professional product photo of {title}, on a marble kitchen counter, soft light"


def build_sd15_inpaint(path: Path) -> Path:
    """SD 1.5 inpainting architecture (runwayml config values), random weights, fp16 files."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    # Built on the GPU (random init of ~1 B parameters takes a minute on a CPU), saved as fp16.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return _build_sd15_inpaint(path)


def _build_sd15_inpaint(path: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )  # fmt: skip
    tokenizer = CLIPTokenizer.from_pretrained(str(ROOT / "tests" / "fixtures" / "tiny-clip-tokenizer"), local_files_only=True)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionInpaintPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(torch.float16).save_pretrained(str(path), safe_serialization=True)
    return path


def product_images(n: int, size: int):
    """Cut-out products (RGB + mask) at the benchmark size, from the sample catalog renderer."""
    from pipelines.sample_catalog import render_product

    out = []
    for i in range(n):
        r = render_product(i, background="plain", degradation="none", size=(size, size))
        out.append((r.photo, r.mask, r.title))
    return out


class GpuMonitor:
    """Mean utilisation and peak memory used on GPU 0 while the block runs (NVML)."""

    def __init__(self):
        self.util: list[int] = []
        self.peak_mb = 0.0
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001 - no NVML (CPU machine): report nothing
            self.nvml = None

    @contextlib.contextmanager
    def watch(self):
        self.util, self.peak_mb = [], 0.0
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                self.util.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
                self.peak_mb = max(self.peak_mb, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20)
                time.sleep(0.05)

        t = threading.Thread(target=sample, daemon=True) if self.nvml else None
        if t:
            t.start()
        try:
            yield self
        finally:
            stop.set()
            if t:
                t.join()

    def summary(self) -> dict:
        if not self.nvml:
            return {"gpu_util_pct": None, "gpu_peak_mem_mb": None}
        return {"gpu_util_pct": round(float(np.mean(self.util)), 1) if self.util else None, "gpu_peak_mem_mb": round(self.peak_mb)}


def timed(fn, n_images: int, monitor: GpuMonitor) -> dict:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with monitor.watch():
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return {"images": n_images, "seconds": round(dt, 3), "images_per_s": round(n_images / dt, 4), **monitor.summary()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48, help="images per timed path (a multiple of every swept batch)")
    ap.add_argument("--sweep", type=int, nargs="*", default=[4, 8, 16, 32], help="batch sizes for the eager sweep (none: give --batch)")
    ap.add_argument("--batch", type=int, default=None, help="skip choosing: run the later paths at this batch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2, help="plain loops and op are timed alternately this many times; best kept")
    ap.add_argument("--default-images", type=int, default=8, help="images for the (slow) default fp16 batch-1 loop")
    ap.add_argument("--pipeline-images", type=int, default=96)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-on-cpu", action="store_true", help="exercise the compiled plain loop on a CPU machine (checks the script)")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-default", action="store_true", help="skip the (slow) default fp16 batch-1 loop")
    ap.add_argument("--cpu-load", type=int, default=0, help="also time the compiled op while N processes keep CPUs busy")
    ap.add_argument("--profile", action="store_true", help="profile one batch of the compiled plain loop and of the op (GPU busy share, syncs)")
    ap.add_argument("--pipeline-concurrency", type=int, nargs="+", default=[1], help="pipeline runs, one per batches-in-flight per actor")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_ray:
        import ray.data  # noqa: F401 - sets Ray's loggers up, so the levels below stick

        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)

    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    from bench.mfu import count_flops, peak_tflops, utilisation
    from ops.base import Item, batch_of, identity_affine
    from ops.composite import feather_alpha, repaint_mask
    from ops.prompts import render
    from ops.registry import op_class
    from ops.torch_runtime import generators, pick_runtime, use_compile_cache

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    tmp = Path(tempfile.mkdtemp(prefix="gpu-scene-"))
    t_build = time.perf_counter()
    if cuda:
        model_note = "SD 1.5 inpainting architecture, random weights, fp16 files"
        model_dir = build_sd15_inpaint(tmp / "sd15-inpaint")
    else:
        from tests.tiny_models import save_tiny_sd

        model_note = "TINY test model (no GPU here): numbers show overheads, not SD 1.5 speed"
        model_dir = save_tiny_sd(tmp / "tiny-inpaint", "inpaint")
    size, steps, n = args.size, args.steps, args.images
    products = product_images(max(n, args.pipeline_images), size)
    images = [Image.fromarray(p) for p, _, _ in products]
    masks = [Image.fromarray(repaint_mask(feather_alpha(m >= 128, 2.0))) for _, m, _ in products]
    prompts = [render(PROMPT, {"title": t}) for _, _, t in products]
    seeds = list(range(1000, 1000 + len(products)))
    dev = "cuda" if cuda else "cpu"
    monitor = GpuMonitor()
    results: dict = {"device": device, "model": model_note, "images": n, "steps": steps, "size": size,
                     "peak_bf16_dense_tflops": peak_tflops(device), "build_s": round(time.perf_counter() - t_build, 1)}  # fmt: skip
    common = {"height": size, "width": size, "num_inference_steps": steps, "guidance_scale": 7.5, "strength": 1.0}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    def section(name, fn):
        """Run one part; a failure is recorded and the later parts still run."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
        save()

    print(f"device: {device}\nmodel: {model_note}\n{n} images, {size}x{size}, {steps} steps", flush=True)
    rt = pick_runtime("auto", "auto")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(model_dir), torch_dtype=rt.dtype, local_files_only=True).to(dev)
    pipe.set_progress_bar_config(disable=True)
    if cuda:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)

    def call(p, sl, k_steps=None):
        return p(prompt=prompts[sl], image=images[sl], mask_image=masks[sl], generator=generators(seeds[sl], dev), output_type="np",
                 **{**common, **({"num_inference_steps": k_steps} if k_steps else {})})  # fmt: skip

    def loop(p, B, k):
        with torch.inference_mode():
            for s in range(0, k, B):
                call(p, slice(s, min(k, s + B)))

    # 1. FLOPs per image: the UNet once per step at 2x batch (CFG), the rest once per image.
    flops = {}

    def count():
        latent = size // 8
        unet_in = pipe.unet.config.in_channels
        with torch.inference_mode():
            x = torch.randn(2, unet_in, latent, latent, device=dev, dtype=rt.dtype)
            ctx = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, device=dev, dtype=rt.dtype)
            t = torch.tensor([500, 500], device=dev)
            unet_step = count_flops(lambda: pipe.unet(x, t, encoder_hidden_states=ctx))
            one_step_call = count_flops(lambda: call(pipe, slice(0, 1), k_steps=1))
        flops.update(unet_per_image=unet_step * steps, total_per_image=unet_step * steps + (one_step_call - unet_step))
        results["flops"] = {k: int(v) for k, v in flops.items()}
        print(f"FLOPs per image: UNet {flops['unet_per_image'] / 1e12:.2f} T, whole call {flops['total_per_image'] / 1e12:.2f} T", flush=True)

    section("flops", count)

    def with_mfu(r: dict) -> dict:
        if flops:
            u = utilisation(flops["unet_per_image"], r["images_per_s"], device)
            r.update(unet_tflops=u["tflops"], mfu=u["mfu"], mfu_all_flops=utilisation(flops["total_per_image"], r["images_per_s"], device)["mfu"])
        return r

    # 2. The default loop users write: fp16, batch 1, PIL output, nothing else tuned.
    def default():
        dtype = torch.float16 if cuda else torch.float32
        p = StableDiffusionInpaintPipeline.from_pretrained(str(model_dir), torch_dtype=dtype, local_files_only=True).to(dev)
        p.set_progress_bar_config(disable=True)

        def run(k):
            for i in range(k):
                p(prompt=prompts[i], image=images[i], mask_image=masks[i], generator=torch.Generator(dev).manual_seed(seeds[i]), **common)

        run(1)
        results["default_loop"] = with_mfu(timed(lambda: run(args.default_images), args.default_images, monitor))
        print("default loop (fp16, batch 1):", results["default_loop"], flush=True)
        del p
        torch.cuda.empty_cache() if cuda else None

    if not args.skip_default:
        section("default_loop", default)

    # 3. Batch sweep of the plain eager loop (bf16, channels_last, batches of B).
    sweep: dict[int, dict] = {}

    def run_sweep():
        for B in args.sweep:
            loop(pipe, B, B)  # warm-up (cuDNN picks its algorithms per shape)
            k = max(n, B)
            sweep[B] = with_mfu(timed(lambda: loop(pipe, B, k), k, monitor))
            print(f"sweep, plain eager loop, batch {B}:", sweep[B], flush=True)
        results["sweep_plain_eager"] = {str(B): r for B, r in sweep.items()}

    section("sweep", run_sweep)
    # The smallest batch within 3% of the fastest: bigger ones only add memory and padding.
    top = max((r["images_per_s"] for r in sweep.values()), default=0)
    best = args.batch or min((B for B, r in sweep.items() if r["images_per_s"] >= 0.97 * top), default=(args.sweep or [8])[0])
    results["batch"] = best
    print(f"batch for the later paths: {best}", flush=True)

    # 4. Compiled plain loop; the op compiled (its CUDA default) and eager; timed alternately.
    params = {"model": str(model_dir), "size": size, "steps": steps, "max_batch": best, "prompt": PROMPT}
    paths: dict = {"plain_loop": lambda k=n: loop(pipe, best, k)}
    compiled_pipe = None

    def compile_plain():
        nonlocal compiled_pipe
        cache = use_compile_cache()
        compiled_pipe = StableDiffusionInpaintPipeline(**pipe.components)
        compiled_pipe.set_progress_bar_config(disable=True)
        compiled_pipe.unet = torch.compile(pipe.unet, dynamic=False)
        t0 = time.perf_counter()
        loop(compiled_pipe, best, best)
        results["compile_s_plain"] = round(time.perf_counter() - t0, 1)
        results["compile_cache"] = cache
        print(f"plain loop: compile + first batch {results['compile_s_plain']} s (cache {cache})", flush=True)
        paths["plain_loop_compiled"] = lambda k=n: loop(compiled_pipe, best, k)

    def op_run(op, k):
        for s in range(0, k, best):
            chunk = products[s : min(k, s + best)]
            items = [Item(p, m, identity_affine(), seeds[s + j], {}) for j, (p, m, _) in enumerate(chunk)]
            op(batch_of(items, {"image": None, "title": [t for _, _, t in chunk]}))

    def make_op(key, compile_flag):
        t0 = time.perf_counter()
        op = op_class("scene")({**params, "compile": compile_flag})
        op.ensure_setup()  # load (+ compile warm-up, from the node's cache when warm)
        ready = time.perf_counter() - t0
        op_run(op, best)
        results[f"{key}_ready_s"] = round(ready, 1)
        results[f"{key}_first_batch_s"] = round(time.perf_counter() - t0, 1)
        print(f"{key}: ready in {ready:.1f} s, first batch done at {results[f'{key}_first_batch_s']} s", flush=True)
        paths[key] = lambda k=n: op_run(op, k)

    if (cuda or args.compile_on_cpu) and not args.no_compile:
        section("compile_plain", compile_plain)
    if cuda and not args.no_compile:
        section("skustudio_op", lambda: make_op("skustudio_op", None))
    section("skustudio_op_eager", lambda: make_op("skustudio_op_eager", False))

    def alternate():
        for _ in range(args.rounds):
            for key, fn in paths.items():
                r = timed(fn, n, monitor)
                if key not in results or r["images_per_s"] > results[key]["images_per_s"]:
                    results[key] = with_mfu(r)
        for key in paths:
            print(f"{key}:", results[key], flush=True)

    section("alternate", alternate)

    # 4b. Is the op sensitive to busy CPUs (as in a pipeline, where CPU stages share the node)?
    def loaded():
        key = "skustudio_op" if "skustudio_op" in paths else "skustudio_op_eager"
        with cpu_load(args.cpu_load):
            results[f"{key}_cpu_loaded"] = with_mfu(timed(paths[key], n, monitor))
        results[f"{key}_cpu_loaded"]["busy_processes"] = args.cpu_load
        print(f"{key} with {args.cpu_load} busy CPU processes:", results[f"{key}_cpu_loaded"], flush=True)

    if args.cpu_load:
        section("cpu_loaded", loaded)

    # 4c. Where a batch's wall time goes: GPU kernels against host-side work and syncs.
    def profile():
        results["profile"] = {}
        for key in ("plain_loop_compiled", "skustudio_op", "plain_loop", "skustudio_op_eager"):
            if key in paths:
                results["profile"][key] = profile_batch(lambda: paths[key](best))
                print(f"profile {key}:", json.dumps(results["profile"][key]), flush=True)

    if args.profile:
        section("profile", profile)
    del pipe, compiled_pipe
    paths.clear()
    from ops import diffusion

    diffusion._pipes.clear()
    torch.cuda.empty_cache() if cuda else None

    # 5. The whole skustudio pipeline on local Ray: decode, the scene step's CPU prepare, the
    #    model on a GPU actor pool, paste-back and finish on CPU workers, encode, write.
    if not args.skip_ray:
        def pipeline(concurrency):
            key = "skustudio_pipeline" if concurrency == 1 else f"skustudio_pipeline_c{concurrency}"
            while key in results:  # a repeated run: its actor finds the compile cache the first one's filled
                key += "_again"
            results[key] = with_mfu(ray_pipeline(products[: args.pipeline_images], tmp, params, best, monitor, concurrency=concurrency, run_id=key))
            print(f"skustudio pipeline (Ray Data, {concurrency} batch(es) in flight per actor):", results[key], flush=True)

        for c in args.pipeline_concurrency:
            section(f"skustudio_pipeline_c{c}", lambda c=c: pipeline(c))

    # 6. Ratios: against the plain loop with the same settings (compiled paths against the
    #    compiled plain loop), and against the plain eager loop.
    eager = results.get("plain_loop", {}).get("images_per_s")
    compiled_ref = "plain_loop_compiled" if cuda and not args.no_compile else "plain_loop"
    same = {"skustudio_op": "plain_loop_compiled", "skustudio_op_cpu_loaded": "plain_loop_compiled", "skustudio_op_eager": "plain_loop",
            "skustudio_op_eager_cpu_loaded": "plain_loop", "plain_loop_compiled": "plain_loop", "default_loop": "plain_loop",
            **{k: compiled_ref for k in results if k.startswith("skustudio_pipeline")}}  # fmt: skip
    for key, ref in same.items():
        r, base = results.get(key), results.get(ref, {}).get("images_per_s")
        if r and base:
            r["x_plain_loop"] = round(r["images_per_s"] / base, 3)
        if r and eager:
            r["x_plain_eager_loop"] = round(r["images_per_s"] / eager, 3)
        if r and results.get("default_loop"):
            r["x_default_loop"] = round(r["images_per_s"] / results["default_loop"]["images_per_s"], 3)
    print("\nimages/s, x same-settings plain loop, x plain eager loop, MFU (UNet), GPU util:")
    for key in ("default_loop", "plain_loop", "plain_loop_compiled", "skustudio_op_eager", "skustudio_op", "skustudio_op_cpu_loaded",
                *sorted(k for k in results if k.startswith("skustudio_pipeline"))):  # fmt: skip
        if key in results:
            r = results[key]
            print(f"  {key:22s} {r['images_per_s']:8.3f}  x{r.get('x_plain_loop', 1):.3f}  x{r.get('x_plain_eager_loop', 1):.3f}  "
                  f"mfu {r.get('mfu')}  util {r.get('gpu_util_pct')}%  peak {r.get('gpu_peak_mem_mb')} MiB")  # fmt: skip
    save()


@contextlib.contextmanager
def cpu_load(processes: int):
    """N processes spinning on numpy work for the duration of the block (ended by pid)."""
    import subprocess

    spin = "import numpy as np\nwhile True: np.sort(np.random.rand(1 << 20))"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(processes)]
    time.sleep(1.0)
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def profile_batch(fn) -> dict:
    """One call under torch.profiler: wall time, GPU kernel time (its share of the wall is the
    GPU's busy share), the host-side syncs, and the host ops that took the most time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()  # warm
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    from torch.autograd import DeviceType

    events = prof.key_averages()

    def dev_us(e):
        # Kernels only: a host op that launched a kernel also carries its device time, and
        # summing both would count every kernel twice.
        if e.device_type != DeviceType.CUDA:
            return 0
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense", "cudaMemcpy")
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "wall_ms": round(wall * 1e3, 1),
        "gpu_kernel_ms": round(sum(dev_us(e) for e in events) / 1e3, 1),
        "gpu_busy": round(sum(dev_us(e) for e in events) / 1e6 / wall, 3),
        "syncs": {e.key: {"count": e.count, "cpu_ms": round(e.self_cpu_time_total / 1e3, 1)} for e in events if e.key.startswith(sync_names)},
        "top_host_ops": [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 1)] for e in top],
    }


def actor_inits(since: float) -> list[tuple[float, float]]:
    """(start, duration) in epoch seconds of the GPU pool actors' constructors (model load and
    compile warm-up) that began after `since`, from Ray's task timeline."""
    import ray

    out = []
    for e in ray.timeline():
        if e.get("name") == "__init__" and "RunSteps" in str(e.get("cat", "")) and e.get("ts", 0) / 1e6 >= since:
            out.append((e["ts"] / 1e6, e.get("dur", 0) / 1e6))
    return sorted(out)


def ray_pipeline(products, tmp: Path, params: dict, batch: int, monitor: GpuMonitor, concurrency: int = 1, run_id: str = "bench") -> dict:
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    import pipelines.run
    from ops.environment import OpenCVBuildError
    from pipelines.run import RunConfig, run_catalog

    try:
        pipelines.run.check_opencv_contrib()
    except OpenCVBuildError as exc:  # the lent GPU machines' image has OpenCV's plain build;
        print(f"note: {exc}; the scene recipe calls no contrib function, so the check is skipped here")
        pipelines.run.check_opencv_contrib = lambda: None

    cat = tmp / "catalog"
    cat.mkdir(exist_ok=True)
    with (cat / "manifest.jsonl").open("w") as fh:
        for i, (photo, mask, title) in enumerate(products):
            p = cat / f"p{i:04d}.png"
            Image.fromarray(np.dstack([photo, mask])).save(p)  # cut-outs: the mask rides in alpha
            fh.write(json.dumps({"sku": f"SKU-{i:04d}", "image_uri": str(p), "title": title}) + "\n")
    recipe = tmp / "scene.yaml"
    step = {"op": "scene", "params": {k: v for k, v in params.items() if k != "compile"}, "batch_size": batch,
            "pool": {"min_size": 1, "max_size": 1, "concurrency": concurrency}}  # fmt: skip
    recipe.write_text(json.dumps({"name": "scene", "output": {"format": "JPEG", "quality": 90}, "ops": [step]}))
    cfg = RunConfig(
        manifest=str(cat / "manifest.jsonl"), recipes=(str(recipe),), output=str(tmp / f"out-{run_id}"), run_id=run_id,
        num_gpus=1, gpu_batch_size=batch, model_cache=str(tmp / "cache"),
    )  # fmt: skip
    with monitor.watch():
        t0 = time.time()
        summary = run_catalog(cfg)
        wall = time.time() - t0
    files = sorted((tmp / f"out-{run_id}" / run_id / "images").rglob("*.jpg"), key=lambda p: p.stat().st_mtime)
    if summary.errors or len(files) != len(products):
        raise SystemExit(f"pipeline run had {summary.errors} errors and {len(files)} images for {len(products)} inputs")
    # Steady state: images finished after the first batch, over the time since it finished.
    t_first, t_last = files[batch - 1].stat().st_mtime, files[-1].stat().st_mtime
    steady = (len(files) - batch) / max(1e-6, t_last - t_first)
    # Where the time goes per row: the scene step's CPU phases beside its model phase.
    spent = [dict(r) for r in pq.read_table(tmp / f"out-{run_id}" / run_id / "variants", columns=["op_seconds"])["op_seconds"].to_pylist()]
    per_row = {k: round(float(np.mean([s.get(k, 0.0) for s in spent])), 4) for k in sorted({k for s in spent for k in s})}
    # The actor's model time per row, its first batch (the one charged with its start-up)
    # apart from the rest, so a slow first call does not hide in the mean.
    first = [s["scene"] for s in spent if s.get("scene.setup")]
    rest = [s["scene"] for s in spent if "scene" in s and not s.get("scene.setup")]
    inits = actor_inits(t0)
    t_actor = inits[0][0] if inits else None
    return {"images": len(files), "seconds": round(wall, 3), "end_to_end_images_per_s": round(len(files) / wall, 4),
            "first_image_s": round(files[0].stat().st_mtime - t0, 1), "images_per_s": round(steady, 4),
            # the pool actors' start-up (model load, compile warm-up), charged to their first batches
            "actor_setup_s": round(sum(s.get("scene.setup", 0.0) for s in spent), 1),
            "op_seconds_per_row": per_row, "concurrency": concurrency,
            "model_s_per_row_first_batch": round(float(np.mean(first)), 4) if first else None,
            "model_s_per_row_later_batches": round(float(np.mean(rest)), 4) if rest else None,
            # From the pool actor's start (its constructor loads and warms the model) to the
            # first image written, and how long the constructor itself took.
            "actor_start_s": round(t_actor - t0, 1) if t_actor else None,
            "actor_init_s": round(inits[0][1], 1) if inits else None,
            "first_image_after_actor_start_s": round(files[0].stat().st_mtime - t_actor, 1) if t_actor else None,
            **monitor.summary()}  # fmt: skip

if __name__ == "__main__":
    main()
