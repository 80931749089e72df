"""LoRA training throughput: skustudio's training step (pipelines/train_loop.py:train_step, what
every Ray Train worker runs) against a plain diffusers + accelerate LoRA loop with the same
model, LoRA config, optimizer and batch, in the same process on the same device.

Per batch size: steps/s, samples/s, peak device memory, and model FLOP utilisation (FLOPs of
one step counted with torch.utils.flop_counter, over the device's dense bf16 peak).

    # SD1.5-sized UNet/VAE/text encoder with random weights, 512 px, on a GPU:
    python bench/train_lora.py --size sd15 --resolution 512 --batch 1 2 4 8 --steps 20 --json bench/results/train_lora-h100.json
    # the tiny test model on a CPU: per-step overhead only, not a throughput claim
    python bench/train_lora.py --size tiny --resolution 64 --batch 1 2 --steps 6

Ray Train's own cost (worker start, process group, checkpoint uploads) is outside the timed
steps; `skustudio train` logs it in the training card as wall_s versus train_s.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.train_loop import LORA_TARGETS, _embed, step_seed, train_step

TOKENIZER = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-clip-tokenizer"
# Dense bf16 peaks (FLOP/s) of the devices these numbers are taken on.
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}


def build(size: str, device):
    """Random-weight components with SD1.5's shapes (or the tests' tiny ones)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    torch.manual_seed(0)
    if size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                            vocab_size=len(tok), max_position_embeddings=77))  # fmt: skip
    else:
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                    cross_attention_dim=32)  # fmt: skip
        vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
        text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, vocab_size=len(tok)))
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for m in (unet, vae, text):
        m.requires_grad_(False)
        m.to(device)
    return {"tokenizer": tok, "text_encoder": text.eval(), "vae": vae.eval(), "unet": unet, "scheduler": sched, "sha256": "", "class_embeddings": None}


def with_lora(unet, rank: int):
    from peft import LoraConfig

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = [p for p in u.parameters() if p.requires_grad]
    return u, params


def examples(n: int, side: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        mask = np.zeros((side, side), np.uint8)
        mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
        out.append({"sku": f"S{i}", "caption": f"a photo of sks product {i}", "image": rng.integers(0, 256, (side, side, 3), dtype=np.uint8), "mask": mask})
    return out


def time_skustudio(parts, rank, batch, steps, side, device, warmup) -> dict:
    unet, params = with_lora(parts["unet"], rank)
    p = {**parts, "unet": unet}
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    cfg = {"background_weight": 1.0, "prior_weight": 0.0}
    data = examples(max(8, batch), side)

    def step(k):
        g = torch.Generator().manual_seed(step_seed(0, k, 0))
        idx = torch.randint(len(data), (batch,), generator=g).tolist()
        train_step(p, unet, opt, params, [data[i] for i in idx], cfg, g, device)

    return _timed(step, steps, warmup, device)


def time_plain(parts, rank, batch, steps, side, device, warmup) -> dict:
    """The loop of diffusers' examples/text_to_image/train_text_to_image_lora.py, condensed."""
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    unet, params = with_lora(parts["unet"], rank)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    unet, opt = acc.prepare(unet, opt)
    vae, sched = parts["vae"], parts["scheduler"]
    data = examples(max(8, batch), side)
    pixels = torch.from_numpy(np.stack([d["image"] for d in data[:batch]])).permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    captions = [d["caption"] for d in data[:batch]]

    def step(_k):
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            emb = _embed(parts, captions, device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), device=device)
        with acc.autocast():
            pred = unet(sched.add_noise(latents, noise, t), t, emb).sample
        loss = F.mse_loss(pred.float(), noise.float())
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _timed(step, steps, warmup, device)


def _timed(step, steps, warmup, device) -> dict:
    for k in range(warmup):
        step(k)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(warmup, warmup + steps):
        step(k)
    _sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"steps_per_s": steps / dt, "peak_gib": peak}


def step_flops(parts, rank, batch, side, device) -> float:
    """FLOPs of one skustudio step (VAE encode, text encoder, UNet forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet, params = with_lora(parts["unet"], rank)
    p = {**parts, "unet": unet}
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = examples(batch, side)
    with FlopCounterMode(display=False) as counter:
        train_step(p, unet, opt, params, data, {"background_weight": 1.0, "prior_weight": 0.0}, torch.Generator().manual_seed(0), device)
    return float(counter.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["sd15", "tiny"], default="tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    parts = build(args.size, device)
    rows = []
    for b in args.batch:
        flops = step_flops(parts, args.rank, b, args.resolution, device)
        plain = time_plain(parts, args.rank, b, args.steps, args.resolution, device, args.warmup)
        ours = time_skustudio(parts, args.rank, b, args.steps, args.resolution, device, args.warmup)
        row = {"batch": b, "flops_per_step": flops}
        for label, r in (("plain_loop", plain), ("skustudio", ours)):
            row[label] = {**r, "samples_per_s": r["steps_per_s"] * b, "tflops": r["steps_per_s"] * flops / 1e12,
                          "mfu": r["steps_per_s"] * flops / peak if peak else None}  # fmt: skip
        row["x_plain_loop"] = ours["steps_per_s"] / plain["steps_per_s"]
        rows.append(row)
        print(f"batch {b}: skustudio {ours['steps_per_s']:.3f} steps/s ({row['skustudio']['samples_per_s']:.2f} samples/s), plain loop "
              f"{plain['steps_per_s']:.3f} steps/s -> {row['x_plain_loop']:.2f}x; {flops / 1e12:.2f} TFLOP/step"
              + (f", MFU {row['skustudio']['mfu']:.1%} vs {row['plain_loop']['mfu']:.1%}" if peak else "")
              + (f", peak {ours['peak_gib']:.1f} GiB vs {plain['peak_gib']:.1f} GiB" if ours["peak_gib"] else ""), flush=True)  # fmt: skip
    print(f"device: {name}; model {args.size} at {args.resolution} px, LoRA rank {args.rank}" + ("" if peak else " (no bf16 peak known: MFU not reported)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "size": args.size, "resolution": args.resolution, "rank": args.rank, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
