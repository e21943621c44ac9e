"""Load an open_clip model and encode images and text into unit-length float32 vectors.

Factory (``load_encoder``), model, image transform and tokenizer stay separate objects on
``ClipEncoder``; names say which is which.  Every part of the project gets its model here,
so provenance (what made a vector) is decided in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "openai"  # the weights the paper used
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PRECISIONS = ("auto", "fp32", "int8", "fp16")
# A faster numeric path is only used if it stays this close to open_clip's fp32 output.
MIN_COSINE_TO_FP32 = 0.999

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded; the message says what to do about it."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """Which model: an open_clip architecture plus either a pretrained tag or a checkpoint file."""

    architecture: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    checkpoint: str | None = None

    @classmethod
    def from_options(cls, model: str | None, pretrained: str | None, checkpoint: str | None) -> "ModelSpec":
        if checkpoint:
            return cls(model or DEFAULT_MODEL, None, str(checkpoint))
        return cls(model or DEFAULT_MODEL, pretrained or DEFAULT_PRETRAINED, None)

    def checkpoint_sha256(self) -> str | None:
        return file_sha256(self.checkpoint) if self.checkpoint else None

    def weights_label(self, checkpoint_sha256: str | None = None) -> str:
        if self.checkpoint:
            return "sha256:" + (checkpoint_sha256 or self.checkpoint_sha256())[:12]
        return self.pretrained


def import_open_clip():
    """open_clip with this project's model configs (``mapclip-tiny``) registered beside its own."""
    try:
        import open_clip
    except ImportError as error:
        raise ModelUnavailable(
            f"open_clip and torch are not installed ({error.name or error}): the serving install encodes "
            "queries with the encoders a collection file carries (add them with: mapclip encoders add DB); "
            "to load, fine-tune or serve a model without them, install datasette-mapclip[load]") from None

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    return open_clip


def pick_device(device: str | None = None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class ClipEncoder:
    """An open_clip model ready to encode, with its image transform and tokenizer."""

    def __init__(self, spec, model, image_transform, tokenizer, device, precision, checkpoint_sha256=None):
        self.spec = spec
        self.model = model
        self.image_transform = image_transform
        self.tokenizer = tokenizer
        self.device = device
        self.checkpoint_sha256 = checkpoint_sha256
        self.dim = int(model.text_projection.shape[1] if hasattr(model, "text_projection") and model.text_projection is not None else model.visual.output_dim)
        image_size = model.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)
        self.precision = "fp32"
        self._image_tower = model.visual
        self._pending_check = False
        if precision == "fp16" or (precision == "auto" and device.startswith("cuda")):
            if not device.startswith("cuda"):
                raise ModelUnavailable("--precision fp16 needs a CUDA GPU; on a CPU use int8 or fp32")
            self.precision = "fp16"
        elif precision in ("int8", "auto"):
            if device != "cpu":
                raise ModelUnavailable("--precision int8 runs on the CPU only; on a GPU use fp16")
            from .quantize import int8_image_tower

            self._image_tower = int8_image_tower(model.visual)
            self.precision = "int8"
            self._pending_check = True  # compared with fp32 on the first batch

    @property
    def name(self) -> str:
        return f"{self.spec.architecture}/{self.spec.weights_label(self.checkpoint_sha256)}"

    def provenance(self) -> dict:
        import open_clip
        import torch

        return {
            "name": self.name,
            "architecture": self.spec.architecture,
            "pretrained": self.spec.pretrained,
            "checkpoint_path": str(Path(self.spec.checkpoint).resolve()) if self.spec.checkpoint else None,
            "checkpoint_sha256": self.checkpoint_sha256,
            "dim": self.dim,
            "image_size": self.image_size,
            "open_clip_version": open_clip.__version__,
            "torch_version": torch.__version__,
        }

    # -- images -------------------------------------------------------------------
    def preprocess(self, image):
        """PIL RGB image -> model input tensor (pixels scaled and normalised exactly once)."""
        return self.image_transform(image)

    def encode_image_tensors(self, pixels) -> np.ndarray:
        """A batch of preprocessed tensors (N, 3, H, W) -> (N, dim) unit float32 array."""
        import torch

        with torch.inference_mode():
            pixels = pixels.to(self.device)
            if self.precision == "fp16":
                with torch.autocast("cuda", dtype=torch.float16):
                    features = self._image_tower(pixels)
            else:
                features = self._image_tower(pixels)
            if self._pending_check:
                self._check_against_fp32(pixels, features)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)

    def _check_against_fp32(self, pixels, features, sample: int = 4):
        """Compare a few images of the first batch with fp32 (a whole fp32 batch would cost
        ~1.5 int8 batches); if int8 drifts, this batch and all later ones use fp32."""
        from .quantize import min_cosine

        self._pending_check = False
        cosine = min_cosine(features[:sample], self.model.visual(pixels[:sample]))
        self.int8_min_cosine = cosine
        if cosine < MIN_COSINE_TO_FP32:
            warnings.warn(
                f"int8 image encoding drifted from fp32 (min cosine {cosine:.5f} < {MIN_COSINE_TO_FP32}); "
                "using fp32 for this model"
            )
            self._image_tower = self.model.visual
            self.precision = "fp32"
            features.copy_(self.model.visual(pixels))

    def encode_images(self, images) -> np.ndarray:
        """PIL images -> (N, dim) unit vectors."""
        import torch

        return self.encode_image_tensors(torch.stack([self.preprocess(image) for image in images]))

    # -- text ---------------------------------------------------------------------
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(list(texts)).to(self.device)
            features = encode_text_trimmed(self.model, tokens)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32)


def encode_text_trimmed(model, tokens):
    """``model.encode_text`` without the padding: the same numbers, several times faster.

    CLIP's text transformer is causal and reads its output at the end-of-text token, so the
    padding after that token (a short query fills ~8 of 77 positions) cannot change the
    result; running only the first L positions skips ~90% of the work for a typical query.
    Models that are not causal or pool differently use ``encode_text`` unchanged.
    """
    if not text_can_be_trimmed(model):
        return model.encode_text(tokens)
    if model.text_pool_type == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    return text_features(model, tokens[:, :int(ends.max()) + 1])


def text_can_be_trimmed(model) -> bool:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    return all(getattr(model, name, None) is not None for name in needed) and \
        getattr(model, "text_pool_type", None) in ("argmax", "eos")


def text_features(model, tokens):
    """The text tower over exactly the positions given (tokens already cut after the end-of-text
    token): what ``encode_text`` computes for a causal model, shape-generic for ONNX export."""
    import open_clip.transformer as oct
    import torch
    from torch import nn

    length = tokens.shape[1]
    try:
        cast_dtype = model.transformer.get_cast_dtype()
    except AttributeError:  # an int8-quantised tower: activations stay float32
        cast_dtype = torch.float32
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = oct.text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, nn.Linear) else x @ model.text_projection
    return x


class ThreadScopedPatch:
    """Module attributes replaced by wrappers that change behaviour only in the threads inside
    ``active()``.  The attributes are shared by every thread, and a server loads its model in one
    thread while others work (a fine-tune building a model, a request reading a checkpoint): a
    plain patch, or a flipped global setting, would reach them too.  Users are counted, so
    overlapping users share one patch and the originals come back with the last one out."""

    def __init__(self, targets):
        # () -> [(owner, name, wrap)], looked up when first patched; wrap(original, inside) returns
        # the replacement, and inside() says whether the calling thread is in active()
        self._targets = targets
        self._lock = threading.Lock()
        self._users = 0
        self._originals: dict = {}
        self._local = threading.local()

    def inside(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def active(self):
        with self._lock:
            if self._users == 0:
                for owner, name, wrap in self._targets():
                    self._originals[(owner, name)] = original = getattr(owner, name)
                    setattr(owner, name, wrap(original, self.inside))
            self._users += 1
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    for (owner, name), original in self._originals.items():
                        setattr(owner, name, original)
                    self._originals.clear()


_INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
               "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_")


def _init_fills():
    import torch.nn.modules.activation
    import torch.nn.modules.transformer
    from torch.nn import init

    fills = {name: getattr(init, name) for name in _INIT_FILLS if hasattr(init, name)}
    targets = [(init, name, _fill_unless_skipping) for name in fills]
    # Modules that imported fills by name hold references of their own (MultiheadAttention's
    # xavier_uniform_: 0.16 s of ViT-B-32's build when left out).
    for module in (torch.nn.modules.activation, torch.nn.modules.transformer):
        targets += [(module, name, _fill_unless_skipping) for name, fill in fills.items()
                    if getattr(module, name, None) is fill]
    return targets


def _fill_unless_skipping(fill, skipping):
    def maybe_fill(tensor, *args, **kwargs):
        return tensor if skipping() else fill(tensor, *args, **kwargs)

    maybe_fill.__wrapped__ = fill
    return maybe_fill


_SKIP_INIT_FILLS = ThreadScopedPatch(_init_fills)


def weights_come_later():
    """Build a model without drawing random initial weights, for a model whose every weight is then
    loaded from a checkpoint (open_clip loads them strictly, so none is left unset): ViT-B-32's random
    initialisation costs about a second of a server's start-up.  Only ``torch.nn.init``'s in-place
    fills are skipped, and only in the calling thread (a model built at the same moment in another
    thread needs its random weights).  Buffers computed in code (attention masks) are built as usual."""
    return _SKIP_INIT_FILLS.active()


def _checkpoint_loading():
    import torch

    return [(torch, "load", _load_mapped), (torch.nn.Module, "load_state_dict", _assign_where_it_fits)]


def _load_mapped(load, mapping):
    def maybe_mapped(f, *args, **kwargs):
        if mapping() and kwargs.get("mmap") is None:
            kwargs["mmap"] = True
        return load(f, *args, **kwargs)

    maybe_mapped.__wrapped__ = load
    return maybe_mapped


def _assign_where_it_fits(load_state_dict, mapping):
    """In the loading thread, the model takes the mapped checkpoint's tensors as its own instead of
    copying them (a copy of ViT-B-32 from the mapping costs 1-1.7 s of a server's start-up, page
    faults included), where each has the shape, dtype and device the model already chose; anything
    else (fp16 weights for an fp32 model, a model on a GPU) is copied as usual."""
    def maybe_assign(module, state_dict, strict=True, assign=False):
        if mapping() and not assign:
            own = module.state_dict()
            assign = all(name in own and tensor.shape == own[name].shape and tensor.dtype == own[name].dtype
                         and tensor.device == own[name].device for name, tensor in state_dict.items())
        return load_state_dict(module, state_dict, strict=strict, assign=assign)

    maybe_assign.__wrapped__ = load_state_dict
    return maybe_assign


_MAP_CHECKPOINTS = ThreadScopedPatch(_checkpoint_loading)


def checkpoint_memory_mapped():
    """``torch.load`` maps the checkpoint file, and the model takes the mapped tensors as its weights,
    instead of reading the file into the process's own memory and copying it: ViT-B-32's 600 MB then
    sit in the page cache (shared, evictable, counted as the process's file pages, not its own
    memory) and the model is ready about a second sooner.  The weights' pages are private to the
    process (copy-on-write): training changes them without touching the file.  Replacing the file
    (a new file, renamed over it) is safe; writing into it in place while a server uses it is not.
    Only in the calling thread: the patched functions are shared by every thread, and torch's own
    switch (``torch.utils.serialization.config.load.mmap``) is not the project's to set.  (A
    checkpoint in torch's old, non-zip format cannot be mapped: ``load_encoder`` then loads it the
    usual way.)"""
    return _MAP_CHECKPOINTS.active()


def load_encoder(
    spec: ModelSpec | None = None,
    *,
    device: str | None = None,
    precision: str = "auto",
    checkpoint_sha256: str | None = None,
) -> ClipEncoder:
    """Build the model named by ``spec``; raise ModelUnavailable with advice if it cannot be had.
    ``checkpoint_sha256``: the checkpoint's hash where the caller has just checked it (else it is
    computed here).

    Process-wide settings (torch threads, the Hugging Face offline switch) are the caller's:
    see ``runtime``."""
    spec = spec or ModelSpec()
    if precision not in PRECISIONS:
        raise ModelUnavailable(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    open_clip = import_open_clip()
    device = pick_device(device)
    if spec.architecture not in open_clip.list_models():
        raise ModelUnavailable(
            f"unknown open_clip architecture {spec.architecture!r}. "
            f"Examples: ViT-B-32, ViT-B-16, ViT-L-14, mapclip-tiny (see open_clip.list_models())"
        )
    if spec.checkpoint:
        if not Path(spec.checkpoint).is_file():
            raise ModelUnavailable(f"checkpoint file not found: {spec.checkpoint}")
        checkpoint_sha256 = checkpoint_sha256 or spec.checkpoint_sha256()
        pretrained = spec.checkpoint
    else:
        tags = open_clip.list_pretrained_tags_by_model(spec.architecture)
        if spec.pretrained not in tags:
            raise ModelUnavailable(
                f"open_clip has no pretrained weights {spec.pretrained!r} for {spec.architecture}; "
                f"known tags: {', '.join(tags) or 'none (use --checkpoint PATH)'}"
            )
        pretrained = spec.pretrained
        checkpoint_sha256 = None
    try:
        try:
            with weights_come_later(), checkpoint_memory_mapped():
                model, _, image_transform = open_clip.create_model_and_transforms(
                    spec.architecture, pretrained=pretrained, device=device
                )
        except Exception as error:
            if "mmap" not in str(error):
                raise
            with weights_come_later():  # an old-format checkpoint file: read, not mapped
                model, _, image_transform = open_clip.create_model_and_transforms(
                    spec.architecture, pretrained=pretrained, device=device
                )
    except Exception as error:  # network, cache, corrupt file: all end in the same advice
        if spec.checkpoint:
            raise ModelUnavailable(
                f"could not load checkpoint {spec.checkpoint} into {spec.architecture}: {error}. "
                "Is it a state_dict saved from this architecture?"
            ) from error
        raise ModelUnavailable(
            f"could not get the {spec.architecture} '{spec.pretrained}' weights: {type(error).__name__}: {error}\n"
            "open_clip downloads them from the Hugging Face Hub on first use. To fix this:\n"
            "  - run the same command once on a machine with internet access, then copy its\n"
            "    Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME) to this machine; or\n"
            "  - download the weights file yourself and pass it with --checkpoint PATH\n"
            "    (keep --model the same architecture)."
        ) from error
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec.architecture)
    return ClipEncoder(spec, model, image_transform, tokenizer, device, precision, checkpoint_sha256)
