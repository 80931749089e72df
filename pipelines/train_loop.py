"""The per-worker LoRA training loop that `skustudio train` hands to Ray Train's TorchTrainer.

Ray Train starts the workers, builds the process group (NCCL on GPUs, gloo on CPUs), wraps
the UNet in DDP (`prepare_model`), persists checkpoints to the run's storage and restarts
failed workers from the latest one. This file only says what one training step is.

Determinism is by construction, so a resumed run ends with the same adapter weights as an
uninterrupted one: each worker keeps a fixed slice of the examples (sorted by sku, every
`world`-th), and step k's batch, noise and timesteps come from a generator seeded by
(seed, k, rank), never from how far an iterator had got before a restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ADAPTER_STATE = "adapter_state.safetensors"  # peft's own keys: what a resumed run loads
OPTIMIZER_STATE = "optimizer.pt"
TRAIN_STATE = "state.json"
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections
EVAL_EXAMPLES = 4


def step_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def my_examples(rows: list[dict], rank: int, world: int) -> list[dict]:
    """This worker's fixed slice of the examples (every world-th after sorting by sku)."""
    ordered = sorted(rows, key=lambda r: (r["sku"], r["caption"]))
    return ordered[rank::world]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (runs on every worker)."""
    import ray.train
    import ray.train.torch
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config["seed"])  # the LoRA initialisation is the same on every worker

    # 1. The base model from the model store (downloaded once per node), frozen, plus LoRA.
    parts = _load_base(config, device)
    unet = parts["unet"]
    unet.add_adapter(LoraConfig(r=config["rank"], lora_alpha=config["alpha"], init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    if config["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=1e-2)

    # 2. Resume from the latest checkpoint when Ray Train restarted us (or the command reran).
    state = {"step": 0, "losses": [], "eval_loss_start": None, "elapsed_s": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            set_peft_model_state_dict(unet, load_file(str(Path(d) / ADAPTER_STATE)))
            optimizer.load_state_dict(torch.load(Path(d) / OPTIMIZER_STATE, map_location="cpu", weights_only=True))
            state = json.loads((Path(d) / TRAIN_STATE).read_text())
        log.info("rank %d: resuming at step %d", rank, state["step"])

    # 3. This worker's examples, decoded once (the set is small: PNG bytes in the dataset).
    rows = [r for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=256, batch_format="pyarrow") for r in batch.to_pylist()]
    mine = [_decode(r, config["resolution"]) for r in my_examples(rows, rank, world)]
    if not mine:
        raise ValueError(f"worker {rank} of {world} got no examples; use fewer workers than examples ({len(rows)})")

    model = ray.train.torch.prepare_model(unet)  # DDP across workers (and to the device)
    if state["eval_loss_start"] is None:
        state["eval_loss_start"] = _eval_loss(parts, mine, config, device)
    t_start = time.perf_counter() - state["elapsed_s"]

    # 4. Steps.
    while state["step"] < config["steps"]:
        step = state["step"] + 1
        g = torch.Generator().manual_seed(step_seed(config["seed"], step, rank))
        idx = torch.randint(len(mine), (config["batch_size_per_worker"],), generator=g).tolist()
        loss = train_step(parts, model, optimizer, params, [mine[i] for i in idx], config, g, device)
        mean = loss.detach().float().clone()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        state["losses"].append(round(float(mean), 6))
        state["step"] = step
        state["elapsed_s"] = time.perf_counter() - t_start
        if config.get("fault_at_step") == step and rank == world - 1 and not _already_faulted(config):
            log.warning("fault injection: worker %d exits after step %d", rank, step)
            os._exit(1)
        done = step == config["steps"]
        if step % config["checkpoint_every"] == 0 or done:
            metrics = {"step": step, "loss": state["losses"][-1]}
            if done:
                state["eval_loss_end"] = _eval_loss(parts, mine, config, device)
                state["base_sha256"] = parts["sha256"]
            with tempfile.TemporaryDirectory() as tmp:
                out = None
                if rank == 0:
                    save_file(get_peft_model_state_dict(unet), str(Path(tmp) / ADAPTER_STATE))
                    torch.save(optimizer.state_dict(), Path(tmp) / OPTIMIZER_STATE)
                    (Path(tmp) / TRAIN_STATE).write_text(json.dumps(state))
                    if done:
                        _save_diffusers_lora(unet, tmp)
                    out = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=out)


def train_step(parts: dict, model, optimizer, params: list, batch: list[dict], config: dict, g, device):
    """One optimizer step on one batch; returns the loss (bench/train_lora.py times this)."""
    import torch

    with _autocast(device):
        loss = _loss(parts, model, batch, config, g, device)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return loss


def _already_faulted(config: dict) -> bool:
    """The injected fault fires once per training run (a marker beside its checkpoints)."""
    from pipelines.storage import exists, write_bytes

    if exists(config["fault_marker"], config["storage"]):
        return True
    write_bytes(config["fault_marker"], b"1", config["storage"])
    return False


def _load_base(config: dict, device) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from ops.models import offline_hub
    from pipelines.model_store import ModelStore

    offline_hub()
    local = ModelStore(config["model_cache"], config["storage"]).fetch(config["base_model"])
    path = str(local.path)
    kw = {"local_files_only": True}
    parts = {
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).to(device),
        "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).to(device),
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw).to(device),
        # DDPM's training view of the model's own noise schedule.
        "scheduler": DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        "sha256": local.sha256,
    }
    for name in ("text_encoder", "vae", "unet"):
        parts[name].requires_grad_(False)
    parts["text_encoder"].eval()
    parts["vae"].eval()
    with torch.no_grad():
        parts["class_embeddings"] = _embed(parts, [config["class_prompt"]], device) if config["prior_weight"] > 0 else None
    return parts


def _decode(row: dict, resolution: int) -> dict:
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(row["image_png"])).convert("RGB"))
    mask = np.asarray(Image.open(io.BytesIO(row["mask_png"])).convert("L"))
    if image.shape[0] != resolution or mask.shape != image.shape[:2]:
        raise ValueError(f"example {row['sku']!r} is {image.shape[:2]}, expected {resolution}x{resolution}")
    return {"sku": row["sku"], "caption": row["caption"], "image": image, "mask": mask}


def _embed(parts: dict, captions: list[str], device):
    tok = parts["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return parts["text_encoder"](ids.to(device))[0]


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(parts: dict, model, batch: list[dict], config: dict, g, device):
    """The denoising loss for one batch, weighted by the product mask when asked, plus the
    prior-preservation term (the adapter kept close to the base model's own prediction for
    the class prompt) when asked."""
    import torch
    import torch.nn.functional as F

    vae, scheduler = parts["vae"], parts["scheduler"]
    # 1. Latents of the images (the VAE is frozen).
    pixels = torch.from_numpy(np.stack([b["image"] for b in batch])).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        eps = torch.randn(dist.mean.shape, generator=g).to(device)
        latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
        emb = _embed(parts, [b["caption"] for b in batch], device)
    # 2. Noise them at random timesteps.
    noise = torch.randn(latents.shape, generator=g).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=g).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
    n = len(batch)
    if config["prior_weight"] > 0:
        # One forward for both terms (DDP expects one forward per backward): the batch, and
        # the same noisy latents under the class prompt.
        cls_emb = parts["class_embeddings"].expand(n, -1, -1)
        both = model(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([emb, cls_emb])).sample
        pred, prior_pred = both[:n], both[n:]
    else:
        pred = model(noisy, t, emb).sample
    # 3. Weight by the product mask at latent resolution (1 inside, background_weight outside).
    err = (pred.float() - target.float()) ** 2
    if config["background_weight"] < 1.0:
        masks = torch.from_numpy(np.stack([b["mask"] for b in batch])).float().div(255.0)[:, None].to(device)
        m = F.adaptive_avg_pool2d(masks, latents.shape[-2:])
        w = config["background_weight"] + (1.0 - config["background_weight"]) * m
        loss = (err * w).sum() / (w.sum() * err.shape[1]).clamp_min(1e-6)
    else:
        loss = err.mean()
    # 4. Prior preservation: for the class prompt, stay with what the base model predicts
    #    (the adapter switched off), so the class keeps its general look.
    if config["prior_weight"] > 0:
        unet = parts["unet"]
        with torch.no_grad():
            unet.disable_adapters()
            prior_target = unet(noisy, t, cls_emb).sample
            unet.enable_adapters()
        loss = loss + config["prior_weight"] * F.mse_loss(prior_pred.float(), prior_target.float())
    return loss


def _eval_loss(parts: dict, examples: list[dict], config: dict, device) -> float:
    """The (unweighted) denoising loss on this worker's first examples with fixed noise: the
    same numbers before and after training, so the two are comparable."""
    import torch

    unet = parts["unet"]
    g = torch.Generator().manual_seed(step_seed(config["seed"], -1, 0))
    cfg = {**config, "background_weight": 1.0, "prior_weight": 0.0}
    with torch.no_grad(), _autocast(device):
        loss = _loss(parts, unet, examples[:EVAL_EXAMPLES], cfg, g, device)
    return round(float(loss), 6)


def _save_diffusers_lora(unet, out_dir: str) -> None:
    """The adapter in diffusers' LoRA format (what `load_lora_weights` reads)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
