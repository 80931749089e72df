"""Tiny models built the way diffusers' own fast tests build them: small configs, a fixed
`torch.manual_seed` before each component, random weights, `save_pretrained` to a folder.
Tests upload the folders to the loopback S3 server and load them through the real model
store, exactly as production weights are loaded."""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER = Path(__file__).parent / "fixtures" / "tiny-clip-tokenizer"

# model_index.json class per kind; the UNet's input channels say what the model can do.
SD_KINDS = {
    "text2img": ("StableDiffusionPipeline", 4),
    "inpaint": ("StableDiffusionInpaintPipeline", 9),
    "instruct": ("StableDiffusionInstructPix2PixPipeline", 8),
}


def save_tiny_sd(path: Path, kind: str = "text2img", seed: int = 0) -> Path:
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    class_name, in_channels = SD_KINDS[kind]
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
        )
    )
    pipe_cls = getattr(diffusers, class_name)
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = pipe_cls(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, **extra)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path


def save_tiny_esrgan(path: Path, scale: int = 2, seed: int = 0) -> Path:
    """A small RRDBNet (ESRGAN) with random weights, as a safetensors state dict."""
    from safetensors.torch import save_file
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def save_tiny_lama(path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file
    from spandrel.architectures.LaMa import LaMa

    torch.manual_seed(seed)
    net = LaMa(in_nc=4, out_nc=3)  # image + mask in, as the published LaMa checkpoints
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _tiny_clip_config(tokenizer):
    from transformers import CLIPConfig

    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def _tiny_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A transformers CLIPModel directory (model, tokenizer, image processor), as a catalog
    owner would save a real one."""
    from transformers import CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    torch.manual_seed(seed)
    CLIPModel(_tiny_clip_config(tokenizer)).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    _tiny_image_processor().save_pretrained(str(path))
    return path


def save_tiny_safety_checker(path: Path, flag_everything: bool, seed: int = 0) -> Path:
    """diffusers' StableDiffusionSafetyChecker with random weights. Its concept thresholds
    decide the outcome: -2 flags every image (a cosine similarity is > -2), +2 flags none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER), local_files_only=True)
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(_tiny_clip_config(tokenizer))
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.concept_embeds_weights.fill_(-2.0 if flag_everything else 2.0)
    checker.save_pretrained(str(path), safe_serialization=True)
    _tiny_image_processor().save_pretrained(str(path))
    return path


def save_tiny_aesthetic_head(path: Path, dim: int = 16, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(1, dim, generator=g), "bias": torch.randn(1, generator=g)}, str(path))
    return path


def save_tiny_salient_onnx(path: Path, family: str = "u2netp", input_side: int | None = None) -> Path:
    """A one-layer salient-object 'model' exported the way the rembg family's are: one ONNX
    graph, a fixed 1 x 3 x S x S input, a 1 x 1 x S x S map out (a sigmoid for U²-Net / ISNet
    exports, logits for BiRefNet). Its weights are set, not random: foreground = darker than a
    white backdrop after the family's own normalisation, so a test can measure IoU through
    the real loading path (file name -> family table -> graph surgery -> batched session)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ops.salient_models import SPECS

    spec = SPECS[family]
    side = input_side or spec.size
    white = sum((1.0 - m) / s for m, s in zip(spec.mean, spec.std))
    grey = sum((0.9 - m) / s for m, s in zip(spec.mean, spec.std))
    k = 8.0 / (white - grey)  # logit +-4 at white and at 90% grey
    weight = np.full((1, 3, 1, 1), -k, np.float32)
    bias = np.array([k * (white + grey) / 2], np.float32)
    nodes = [helper.make_node("Conv", ["input.1", "w", "b"], ["logits"])]
    nodes.append(helper.make_node("Identity", ["logits"], ["out"]) if spec.logits else helper.make_node("Sigmoid", ["logits"], ["out"]))
    graph = helper.make_graph(
        nodes,
        "tiny_salient",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, side, side])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
