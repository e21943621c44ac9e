"""Training pairs as tensors: images decoded once, captions tokenised once.

Why: decoding a JPEG costs far more than a tiny model's forward pass, and a fine-tuning set
(the demo's 300 images, the paper's ~10,000) is read every epoch.  Images are decoded with
``datasette_mapclip.model.images.open_image`` (the loaders' own safe decoder), shrunk to just above
the model's input size and kept in RAM when they fit; pixels are then scaled and normalised
exactly once, by open_clip's transform (the seed rescaled them twice and trained on
near-black images).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence

from PIL import Image

from datasette_mapclip.model.images import ImageDecodeError, open_image

from .dataset import Pair

log = logging.getLogger(__name__)

# Cached images keep their shorter side at this multiple of the model's input size, so the
# random crops of the train transform still see real pixels (224 -> 256, as ImageNet does).
CACHE_SIDE_FACTOR = 1.15
# Cache automatically below this many bytes of decoded pixels.
AUTO_CACHE_BYTES = 4 << 30


def shrink(image: Image.Image, shortest: int) -> Image.Image:
    """Resize so the shorter side is ``shortest`` (never enlarge)."""
    width, height = image.size
    if min(width, height) <= shortest:
        return image
    scale = shortest / min(width, height)
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


class ImageSource:
    """Bytes from a local path or URL (the loaders' fetcher: rate limits, retries), decoded."""

    def __init__(self, image_size: int, fetcher=None):
        self.image_size = image_size
        self.cache_side = round(image_size * CACHE_SIDE_FACTOR)
        self._fetcher = fetcher

    @property
    def fetcher(self):
        if self._fetcher is None:
            from loaders.fetch import Fetcher

            self._fetcher = Fetcher()
        return self._fetcher

    def load(self, location: str) -> Image.Image:
        from loaders.fetch import FetchError

        try:
            data = self.fetcher.get_bytes(location)
        except FetchError as error:
            raise ImageDecodeError(f"cannot read {location}: {error}") from None
        return shrink(open_image(data, min_size=self.cache_side), self.cache_side)

    def __getstate__(self):  # DataLoader workers get their own HTTP client
        return {**self.__dict__, "_fetcher": None}


def load_all(source: ImageSource, locations: Sequence[str], *, workers: int = 4,
             progress: bool = True, desc: str = "decoding") -> tuple[list[Image.Image | None], list[str]]:
    """Decode every image once, in threads; (images with None for failures, failure messages)."""
    from tqdm import tqdm

    images: list[Image.Image | None] = [None] * len(locations)
    errors: list[str] = []

    def one(index):
        try:
            return index, source.load(locations[index]), None
        except (ImageDecodeError, OSError) as error:
            return index, None, f"{locations[index]}: {error}"

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(locations), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for index, image, error in pool.map(one, range(len(locations))):
            images[index] = image
            if error:
                errors.append(error)
            bar.update(1)
    return images, errors


def should_cache(count: int, image_size: int, mode: str = "auto") -> bool:
    if mode in ("yes", "no"):
        return mode == "yes"
    side = round(image_size * CACHE_SIDE_FACTOR)
    return count * side * side * 3 * 1.4 < AUTO_CACHE_BYTES  # 1.4: non-square maps


class PairDataset:
    """A torch-style dataset of (pixels, tokens); images from RAM when cached.

    ``deterministic``: the transform has no randomness (validation, test), so its output
    tensors themselves are kept after the first epoch."""

    def __init__(self, pairs: list[Pair], tokens, transform: Callable, source: ImageSource,
                 images: list[Image.Image | None] | None = None, deterministic: bool = False):
        self.pairs = pairs
        self.tokens = tokens
        self.transform = transform
        self.source = source
        self.images = images
        self.deterministic = deterministic
        self._tensors: dict[int, object] = {}

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        if index in self._tensors:
            return self._tensors[index], self.tokens[index]
        if self.images is not None:
            image = self.images[index]
        else:
            try:
                image = self.source.load(self.pairs[index].image)
            except (ImageDecodeError, OSError) as error:
                log.warning("skipping %s: %s", self.pairs[index].image, error)
                return None
        pixels = self.transform(image)
        if self.deterministic and self.images is not None:
            self._tensors[index] = pixels
        return pixels, self.tokens[index]


def collate(batch):
    """Stack a batch, leaving out images that could not be read."""
    import torch

    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return torch.stack([pixels for pixels, _ in batch]), torch.stack([tokens for _, tokens in batch])


def prepare_split(pairs: list[Pair], tokenizer, transform, source: ImageSource, *, cache: bool,
                  workers: int, progress: bool, deterministic: bool, desc: str) -> tuple[PairDataset, list[str]]:
    """Tokenise captions, decode images once if caching, and drop pairs whose image failed."""
    errors: list[str] = []
    images = None
    if cache and pairs:
        images, errors = load_all(source, [p.image for p in pairs], workers=workers, progress=progress, desc=desc)
        keep = [i for i, image in enumerate(images) if image is not None]
        pairs = [pairs[i] for i in keep]
        images = [images[i] for i in keep]
    tokens = tokenizer([p.caption for p in pairs]) if pairs else None
    return PairDataset(pairs, tokens, transform, source, images, deterministic), errors
