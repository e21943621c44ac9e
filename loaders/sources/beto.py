"""The seed's precomputed embeddings: ``beto.pt`` (N x 512 tensor) and ``beto_idx.pt`` (N IIIF URLs).

They were made with OpenAI's ViT-B/32, so they are stored as ``ViT-B-32/openai`` and can be
searched with the same model's text encoder.  Both files are pickles: they are read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import numpy as np

from datasette_mapclip.model import iiif
from datasette_mapclip.store.records import SHEET_RANGE, FieldError, MapRecord, parse_whole_number

from .file_list import CsvTextError, csv_rows, https, item_id_from_url, read_csv_text

BETO_PROVENANCE = {
    "name": "ViT-B-32/openai",
    "architecture": "ViT-B-32",
    "pretrained": "openai",
    "checkpoint_path": None,
    "checkpoint_sha256": None,
    "image_size": 224,
    "open_clip_version": None,  # made by the seed with OpenAI's clip package, not open_clip
    "torch_version": None,
}


class BetoError(ValueError):
    pass


def read_beto(beto_path: str, index_path: str) -> tuple[np.ndarray, list[str]]:
    import pickle

    import torch

    try:
        matrix = torch.load(beto_path, map_location="cpu", weights_only=True)
        urls = torch.load(index_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BetoError(f"refusing to load: the file holds more than tensors and lists ({error})") from None
    except (OSError, RuntimeError, EOFError) as error:
        raise BetoError(f"cannot read {beto_path} / {index_path}: {error}") from None
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        raise BetoError(f"{beto_path} should hold an N x D tensor, got {type(matrix).__name__} {getattr(matrix, 'shape', '')}")
    if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) for u in urls):
        raise BetoError(f"{index_path} should hold a list of image URLs")
    if len(urls) != matrix.shape[0]:
        raise BetoError(f"{beto_path} has {matrix.shape[0]} rows but {index_path} has {len(urls)} URLs")
    return matrix.float().numpy(), list(urls)


def files_lookup(files_csv: str | None) -> dict[str, dict]:
    """canonical image URL -> the seed file-list row (item id, 0-based segment)."""
    if not files_csv:
        return {}
    try:
        text, _ = read_csv_text(files_csv)  # any encoding: only URLs and numbers are read from it
        return {iiif.canonical(row["file_url"]): row for _, row in csv_rows(text, files_csv) if row.get("file_url")}
    except (CsvTextError, OSError) as error:
        raise BetoError(str(error)) from None


def _sheet(segment) -> int | None:
    """The 1-based sheet of a 0-based ``segment_num``; None for a value that is not one ("²", 10^20)."""
    try:
        index = parse_whole_number(segment, name="segment_num", low=SHEET_RANGE[0], high=SHEET_RANGE[1] - 1)
    except FieldError:
        return None
    return None if index is None else index + 1


def beto_records(urls: list[str], lookup: dict[str, dict], size: int = iiif.DEFAULT_SIZE) -> list[MapRecord]:
    records = []
    for url in urls:
        key = iiif.canonical(url)
        row = lookup.get(key, {})
        records.append(
            MapRecord(
                source_id=key,
                location=iiif.sized(url, size),
                source="beto",
                item_id=item_id_from_url(row.get("p1_item_id")),
                sheet=_sheet(row.get("segment_num")),
                item_url=https(row.get("p1_item_id")) or None,
                image_url=key,
                thumbnail_url=iiif.sized(url, iiif.THUMBNAIL_SIZE),
            )
        )
    return records
