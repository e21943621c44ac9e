"""Export a model's query side for serving without torch (``query_encoders.QueryEncoder`` reads it).

    ClipEncoder (open_clip, torch)
      -> text tower and image tower as ONNX (torch.export; any batch size, any text length)
      -> the tokenizer as a ``tokenizers`` JSON built from open_clip's own BPE vocabulary
      -> the image preprocessing as numbers (size, resize mode, mean, std)
      -> checked against open_clip on the probe set (probes.py): the same token ids for every text,
         fp32 cosines >= 0.9999; each tower is stored int8 (ONNX Runtime's dynamic quantization)
         only where every probe's cosine to open_clip's fp32 vector is >= 0.995, else fp32, and the
         check's figures are stored with it.

Exporting takes seconds to a minute and the result depends only on the weights, so it is kept in a
cache folder (``MAPCLIP_ENCODER_CACHE``, default ``~/.cache/mapclip/query-encoders``; ``off`` turns it
off) keyed by the weights' identity and the versions that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .probes import probe_images, probe_texts
from .query_encoders import CLEAN_MODES, RESIZE_MODES, QueryEncoder

EXPORT_FORMAT = 1
INT8_MIN_COSINE = 0.995  # a tower is stored int8 only if every probe stays this close to open_clip's fp32
FP32_MIN_COSINE = 0.9999  # the exported fp32 graph must reproduce open_clip (else the export is refused)
CACHE_ENV = "MAPCLIP_ENCODER_CACHE"
TOKENIZER_PATTERN = (r"<start_of_text>|<end_of_text>|(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]"
                     r"|[^\s\p{L}\p{N}]+")  # open_clip's SimpleTokenizer pattern, for the tokenizers library


class ExportError(RuntimeError):
    """This model's query side cannot be exported (the message says why); it is served with torch."""


@dataclasses.dataclass
class ExportedEncoders:
    parts: dict[str, bytes]  # text, image (ONNX), tokenizer (tokenizers JSON), preprocess (JSON)
    precisions: dict[str, str]  # text/image -> int8 or fp32
    check: dict  # the probe check's figures

    def save(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        for part, data in self.parts.items():
            (folder / part).write_bytes(data)
        (folder / "meta.json").write_text(json.dumps({"precisions": self.precisions, "check": self.check}))

    @classmethod
    def load(cls, folder: Path) -> "ExportedEncoders | None":
        try:
            meta = json.loads((folder / "meta.json").read_text())
            parts = {part: (folder / part).read_bytes() for part in ("text", "image", "tokenizer", "preprocess")}
        except (OSError, ValueError):
            return None
        return cls(parts, meta["precisions"], meta["check"])


def _tokenizer_of(encoder):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = encoder.tokenizer
    if not isinstance(tokenizer, SimpleTokenizer) or getattr(tokenizer, "reduction_fn", None) is not None:
        raise ExportError(f"{encoder.spec.architecture}'s tokenizer ({type(tokenizer).__name__}) is not CLIP's BPE "
                          "tokenizer, which is what can be stored for serving without torch")
    return tokenizer


def tokenizer_json(tokenizer, context_length: int) -> str:
    """open_clip's SimpleTokenizer as a ``tokenizers`` JSON (text cleaning stays in Python:
    ``query_encoders.clean_text``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    built = Tokenizer(models.BPE(vocab=dict(tokenizer.encoder), merges=merges, end_of_word_suffix="</w>",
                                 fuse_unk=False))
    built.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOKENIZER_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    built.decoder = decoders.ByteLevel()
    specials = [tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]]
    built.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    built.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A {specials[1]}",
        special_tokens=[(specials[0], tokenizer.sot_token_id), (specials[1], tokenizer.eot_token_id)])
    built.enable_truncation(max_length=context_length)
    return built.to_str()


def preprocess_config(encoder, tokenizer) -> dict:
    model = encoder.model
    preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    resize_mode = preprocess_cfg.get("resize_mode", "shortest")
    interpolation = preprocess_cfg.get("interpolation", "bicubic")
    if resize_mode not in RESIZE_MODES or interpolation not in ("bicubic", "bilinear"):
        raise ExportError(f"{encoder.spec.architecture} resizes images with {resize_mode}/{interpolation}, "
                          "which the server cannot reproduce without torch")
    clean = {"_clean_lower": "lower", "_clean_whitespace": "whitespace",
             "_clean_canonicalize": "canonicalize"}.get(getattr(tokenizer.clean_fn, "__name__", ""), None)
    if clean not in CLEAN_MODES:
        raise ExportError(f"{encoder.spec.architecture}'s tokenizer cleans text in a way the server cannot reproduce")
    from .clip import text_can_be_trimmed

    return {
        "format": EXPORT_FORMAT,
        "model": encoder.name,
        "architecture": encoder.spec.architecture,
        "dim": encoder.dim,
        "image_size": encoder.image_size,
        "resize_mode": resize_mode,
        "interpolation": interpolation,
        "mean": [float(v) for v in preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))],
        "std": [float(v) for v in preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))],
        "context_length": int(tokenizer.context_length),
        "clean": clean,
        "sot_token_id": int(tokenizer.sot_token_id),
        "eot_token_id": int(tokenizer.eot_token_id),
        # a causal text tower read at the end-of-text token (argmax): padding after it cannot change
        # the vector, so queries are run only up to it (as ClipEncoder does)
        "trim": text_can_be_trimmed(model),
    }


def _towers(model):
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .clip import text_can_be_trimmed, text_features

    trim = text_can_be_trimmed(model)

    class TextTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return F.normalize(text_features(self.model, tokens) if trim else self.model.encode_text(tokens), dim=-1)

    class ImageTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, pixels):
            return F.normalize(self.visual(pixels), dim=-1)

    return TextTower().eval(), ImageTower().eval(), torch


def _onnx_bytes(module, example, name: str, dynamic: dict, folder: Path) -> bytes:
    import torch

    path = folder / f"{name}.onnx"
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[name], output_names=["vectors"],
                                    dynamic_shapes={name: dynamic}, opset_version=18, verbose=False)
        program.save(str(path))
    if any(p.name != path.name for p in folder.glob(f"{name}.onnx*")):
        raise ExportError(f"the {name} tower is too large for one ONNX file")
    return path.read_bytes()


def _int8_bytes(model_bytes: bytes, folder: Path, name: str) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = folder / f"{name}-fp32.onnx", folder / f"{name}-int8.onnx"
    source.write_bytes(model_bytes)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process a model for static quantization
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)
    return target.read_bytes()


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def cache_key(encoder, int8: bool) -> str:
    import open_clip
    import torch

    identity = [encoder.spec.architecture, encoder.spec.pretrained, encoder.checkpoint_sha256, open_clip.__version__,
                torch.__version__, EXPORT_FORMAT, int8, INT8_MIN_COSINE]
    return hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()[:32]


def cache_folder() -> Path | None:
    configured = os.environ.get(CACHE_ENV)
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mapclip" / "query-encoders"


def export_query_encoders(encoder, *, int8: bool = True) -> ExportedEncoders:
    """The query side of ``encoder`` (a ClipEncoder), checked on the probe set; ExportError if it
    cannot be exported faithfully.  Reused from the cache folder when these weights were exported
    before by the same versions."""
    cache = cache_folder()
    key = cache_key(encoder, int8)
    if cache is not None:
        found = ExportedEncoders.load(cache / key)
        if found is not None:
            return found
    try:
        exported = _export(encoder, int8)
    except ModuleNotFoundError as error:
        raise ExportError(f"exporting needs {error.name}: pip install 'datasette-mapclip[load]'") from None
    if cache is not None:
        with contextlib.suppress(OSError):
            staging = Path(tempfile.mkdtemp(prefix=".export-", dir=_ensure(cache)))
            exported.save(staging)
            os.replace(staging, cache / key)
    return exported


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _export(encoder, int8: bool) -> ExportedEncoders:
    tokenizer = _tokenizer_of(encoder)
    preprocessing = preprocess_config(encoder, tokenizer)
    text_tower, image_tower, torch = _towers(encoder.model)
    if next(encoder.model.parameters()).device.type != "cpu":
        raise ExportError("export runs on the CPU: load the model with --device cpu")
    texts, images = probe_texts(), probe_images()
    tokenizer_text = tokenizer_json(tokenizer, preprocessing["context_length"])
    parts = {"tokenizer": tokenizer_text.encode("utf-8"), "preprocess": json.dumps(preprocessing, sort_keys=True).encode()}

    with torch.inference_mode():
        reference_tokens = tokenizer(texts)
        text_reference = torch.nn.functional.normalize(encoder.model.encode_text(reference_tokens).float(), dim=-1).numpy()
        pixels = torch.stack([encoder.image_transform(image.convert("RGB")) for image in images])
        image_reference = torch.nn.functional.normalize(encoder.model.encode_image(pixels).float(), dim=-1).numpy()

    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    length = Dim("length", min=2, max=preprocessing["context_length"])
    with tempfile.TemporaryDirectory(prefix="mapclip-export-") as scratch:
        folder = Path(scratch)
        if preprocessing["trim"]:
            parts["text"] = _onnx_bytes(text_tower, reference_tokens[:3, :12], "tokens", {0: batch, 1: length}, folder)
        else:
            parts["text"] = _onnx_bytes(text_tower, reference_tokens[:3], "tokens", {0: batch}, folder)
        parts["image"] = _onnx_bytes(image_tower, pixels[:2], "pixels", {0: batch}, folder)

        # the stored query side, run as the server runs it, against open_clip
        served = QueryEncoder(parts, threads=None)
        for text, ids in zip(texts, reference_tokens.numpy()):
            mine = served.tokenize([text])[0]
            if not np.array_equal(mine, ids[:len(mine)]) or ids[len(mine):].any():
                raise ExportError(f"the stored tokenizer gives other token ids than open_clip for {text[:40]!r}")
        text_fp32 = _min_cosine(served.encode_texts(texts), text_reference)
        image_fp32 = _min_cosine(served.encode_images(images), image_reference)
        if min(text_fp32, image_fp32) < FP32_MIN_COSINE:
            raise ExportError(f"the exported towers do not reproduce open_clip (min cosine text {text_fp32:.6f}, "
                              f"image {image_fp32:.6f})")
        check = {"texts": len(texts), "images": len(images), "threshold": INT8_MIN_COSINE,
                 "fp32_min_cosine": {"text": round(text_fp32, 6), "image": round(image_fp32, 6)},
                 "int8_min_cosine": {}}
        precisions = {"text": "fp32", "image": "fp32"}
        if int8:
            quantized = {part: _int8_bytes(parts[part], folder, part) for part in ("text", "image")}
            trial = QueryEncoder({**parts, **quantized}, threads=None)
            cosines = {"text": _min_cosine(trial.encode_texts(texts), text_reference),
                       "image": _min_cosine(trial.encode_images(images), image_reference)}
            for part, cosine in cosines.items():
                check["int8_min_cosine"][part] = round(cosine, 6)
                if cosine >= INT8_MIN_COSINE:
                    parts[part], precisions[part] = quantized[part], "int8"
        check["stored"] = dict(precisions)
    return ExportedEncoders(parts, precisions, check)
