"""Does a compiled diffusion op find the node's compile cache in a new process, from a copied
model folder, and in a Ray actor? Prints set-up time, the first two calls' times and
Inductor's / AOTAutograd's cache counters for each (a diagnostic for docs/benchmarks.md).

    SKUSTUDIO_COMPILE_CACHE=/tmp/cc python bench/compile_cache.py --model DIR --where process
    ... --where actor
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def probe(model: str, batch: int, size: int = 512) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from ops.base import Item, batch_of, identity_affine
    from ops.models import local_model
    from ops.registry import op_class

    out = {"pid": os.getpid(), "cwd": os.getcwd(), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "threads_before": torch.get_num_threads()}
    t0 = time.perf_counter()
    op = op_class("scene")({"model": model, "size": size, "steps": 20, "max_batch": batch})
    op.bind_models({"model": local_model(model)})
    op.ensure_setup()
    out["setup_s"] = round(time.perf_counter() - t0, 1)
    out["after_setup"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    from pipelines.sample_catalog import render_product

    items = []
    for i in range(batch):
        r = render_product(i, background="plain", degradation="none", size=(size, size))
        items.append(Item(r.photo, r.mask, identity_affine(), i, {"title": r.title}))
    for k in (1, 2):
        t1 = time.perf_counter()
        op(batch_of(items, {"image": None, "title": ["x"] * batch}))
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        out[f"call{k}_s"] = round(time.perf_counter() - t1, 2)
    out["after_calls"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    out["cache_env"] = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "SKUSTUDIO_COMPILE_CACHE")}
    out["threads_after"] = torch.get_num_threads()
    return out


def probe_unet(model: str, threads: int | None = None) -> dict:
    """The UNet alone through the same load and compile path (works on a CPU): compile, one
    forward at batch 2, and the cache counters. `threads` sets torch's thread count first."""
    import torch
    from torch._dynamo.utils import counters

    from ops.diffusion import load_pipeline
    from ops.models import local_model
    from ops.torch_runtime import pick_runtime

    if threads:
        torch.set_num_threads(threads)
    out = {"pid": os.getpid(), "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "omp": os.environ.get("OMP_NUM_THREADS"), "threads": torch.get_num_threads()}
    rt = pick_runtime("auto", "auto")
    pipe = load_pipeline(local_model(model), "inpaint", rt, compile_unet=True)
    if not rt.on_gpu:  # load_pipeline compiles on CUDA only; compile the same way here
        from ops.torch_runtime import use_compile_cache

        use_compile_cache()
        pipe.unet = torch.compile(pipe.unet, dynamic=False)
    u = pipe.unet
    cfg = u._orig_mod.config if hasattr(u, "_orig_mod") else u.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=rt.dtype, device=rt.device)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, dtype=rt.dtype, device=rt.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        u(x, torch.tensor([10, 10], device=rt.device), encoder_hidden_states=ctx)
    out["compile_and_call_s"] = round(time.perf_counter() - t0, 1)
    out["counters"] = {k: {n: c for n, c in v.items() if "cache" in n} for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--where", choices=["process", "actor"], default="process")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--unet-only", action="store_true", help="compile the UNet alone (also on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="with --unet-only: torch threads before compiling")
    args = ap.parse_args()
    fn, fargs = (probe_unet, (args.model, args.threads)) if args.unet_only else (probe, (args.model, args.batch, args.size))
    if args.where == "process":
        print(json.dumps({"where": "process", **fn(*fargs)}), flush=True)
        return
    import ray

    ray.init(num_gpus=1, include_dashboard=False, logging_level="WARNING")
    remote = ray.remote(num_gpus=1, num_cpus=1)(fn)
    t0 = time.time()
    result = ray.get(remote.remote(*fargs))
    print(json.dumps({"where": "ray task", "wall_s": round(time.time() - t0, 1), **result}), flush=True)


if __name__ == "__main__":
    main()
