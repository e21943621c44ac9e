"""Query encoders that run without torch: a model's text and image towers as ONNX, its tokenizer as a
``tokenizers`` JSON and its image preprocessing as plain numbers, all read from the collection file
(``store``'s ``query_encoders`` and ``encoder_files`` tables; written by ``export.py``).

``QueryEncoder`` gives the same vectors as open_clip for the same model (the export checks it on a
probe set): the text is cleaned as open_clip cleans it (ftfy, HTML entities, whitespace, lower
case), tokenized by the stored BPE, and read up to its end-of-text token; an image is resized,
centre-cropped and normalised as open_clip's transform does, in numpy and Pillow.
"""

from __future__ import annotations

import concurrent.futures
import html
import json
import string
import threading

import numpy as np
from PIL import Image

from .clip import ModelUnavailable

PARTS = ("text", "image", "tokenizer", "preprocess")
RESIZE_MODES = ("shortest", "squash")  # open_clip's resize modes reproduced here
CLEAN_MODES = ("lower", "whitespace", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class QueryEncodersUnavailable(RuntimeError):
    """The file carries no usable query encoders for a model (or onnxruntime is missing)."""


def _basic_clean(text: str) -> str:
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_text(text: str, mode: str) -> str:
    """open_clip's text cleaning, by name (``tokenizer.get_clean_fn``)."""
    text = _basic_clean(text)
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split()).strip()
    return text.lower() if mode == "lower" else text


def preprocess(image: Image.Image, preprocessing: dict) -> np.ndarray:
    """An RGB image -> the model's input (3, S, S) float32, as open_clip's transform makes it."""
    size = int(preprocessing["image_size"])
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[preprocessing.get("interpolation", "bicubic")]
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if preprocessing.get("resize_mode", "shortest") == "squash":
        image = image.resize((size, size), resample)
    else:
        # torchvision's Resize(int): the shorter side becomes ``size``, the other keeps the ratio
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        if new != (width, height):
            image = image.resize(new, resample)
        width, height = image.size
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(preprocessing["mean"], np.float32)) / np.asarray(preprocessing["std"], np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _session(model_bytes: bytes, threads: int | None, *, quick_start: bool = False):
    """An ONNX Runtime session.  ``quick_start``: basic graph optimisations only, for the text tower a
    server's first search waits for: its session opens ~0.1-0.2 s sooner (ViT-B-32 int8 on 2 cores)
    for ~3% more time per text query (measured beside the full optimisations, one thread)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise QueryEncodersUnavailable("onnxruntime is not installed (pip install onnxruntime)") from None
    options = ort.SessionOptions()
    if quick_start:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    # No spinning: ONNX Runtime's threads otherwise keep busy-waiting for more work after each query,
    # taking the cores the index's scan threads and the server need next (on 2 cores a text search
    # ran at p50 35-41 ms with spinning, 20-22 ms without, the encoding itself 8 ms either way or less).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


class QueryEncoder:
    """A model's query side from the collection file: ``encode_texts`` and ``encode_images`` as
    ``ClipEncoder`` has them, unit float32 vectors, no torch."""

    def __init__(self, parts: dict[str, bytes], precisions: dict[str, str] | None = None, threads: int | None = None):
        from tokenizers import Tokenizer

        missing = [part for part in PARTS if part not in parts]
        if missing:
            raise QueryEncodersUnavailable(f"the stored query encoders lack {', '.join(missing)}")
        self.preprocessing = json.loads(parts["preprocess"])
        # The tokenizer is parsed beside the text tower's read and session (each ~0.1-0.2 s, and
        # ONNX Runtime and SQLite let go of the GIL meanwhile): a server's first search waits for both.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mapclip-tokenizer") as side:
            tokenizer = side.submit(Tokenizer.from_str, parts["tokenizer"].decode("utf-8"))
            text = parts["text"]() if callable(parts["text"]) else parts["text"]
            self.text_session = _session(text, threads, quick_start=True)
            self.tokenizer = tokenizer.result()
        # The image tower (the larger) is opened at the first image query: a server's first text
        # search does not wait for it.  ``parts["image"]``: its bytes, or a function reading them.
        self._image_bytes, self._image_session, self._threads = parts["image"], None, threads
        self.dim = int(self.preprocessing["dim"])
        self.image_size = int(self.preprocessing["image_size"])
        self.context_length = int(self.preprocessing["context_length"])
        precisions = precisions or {}
        self.precision = "/".join(f"{part} {precisions.get(part, 'fp32')}" for part in ("text", "image"))
        self.lock = threading.Lock()  # ONNX Runtime sessions are thread-safe; one run at a time keeps cores free

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """(N, L) token ids, L up to the longest text's end-of-text token (the rest is padding a causal
        text tower never reads)."""
        mode = self.preprocessing.get("clean", "lower")
        rows = [self.tokenizer.encode(clean_text(text, mode)).ids for text in texts]
        tokens = np.zeros((len(rows), self.context_length), np.int64)
        for i, ids in enumerate(rows):  # the stored tokenizer truncates, keeping the end-of-text token
            tokens[i, :len(ids)] = ids[:self.context_length]
        if not self.preprocessing.get("trim"):
            return tokens
        length = max((len(ids) for ids in rows), default=2)
        return tokens[:, :max(2, min(length, self.context_length))]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenize(list(texts))
        return _unit(self._run(self.text_session, "tokens", tokens, "text"))

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.preprocessing)

    @property
    def image_session(self):
        with self.lock:
            if self._image_session is None:
                try:
                    data = self._image_bytes() if callable(self._image_bytes) else self._image_bytes
                    self._image_session = _session(data, self._threads)
                except QueryEncodersUnavailable:
                    raise
                except Exception as error:  # a stored graph ONNX Runtime cannot load: say why, no 500
                    raise ModelUnavailable(f"the stored image encoder failed to load: {type(error).__name__}: "
                                           f"{str(error).splitlines()[0][:300] if str(error) else ''}") from None
                self._image_bytes = None
            return self._image_session

    def encode_images(self, images) -> np.ndarray:
        pixels = np.stack([self.preprocess(image) for image in images])
        return _unit(self._run(self.image_session, "pixels", pixels, "image"))

    def _run(self, session, name: str, values: np.ndarray, part: str) -> np.ndarray:
        """One run; a stored graph that fails (a tokenizer that does not fit the tower, a damaged
        file) is ModelUnavailable with the reason: the search answers 503, never a 500."""
        try:
            with self.lock:
                return session.run(None, {name: values})[0]
        except Exception as error:
            raise ModelUnavailable(f"the stored {part} encoder failed: {type(error).__name__}: "
                                   f"{str(error).splitlines()[0][:300] if str(error) else ''}") from None


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)
