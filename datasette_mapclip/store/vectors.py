"""Vector encoding shared by every part: little-endian float32 BLOBs.

This is the encoding Datasette's ``llm`` tools use (``struct.pack("<" + "f" * n, ...)``)
and the one sqlite-vec accepts directly in ``vec0 ... MATCH ?``, so a vector stored
here can be read back with nothing but numpy: ``np.frombuffer(blob, dtype="<f4")``.
"""

from __future__ import annotations

import numpy as np

FLOAT32_LE = np.dtype("<f4")


def encode(vector) -> bytes:
    """One vector (any float sequence) -> little-endian float32 BLOB."""
    array = np.asarray(vector, dtype=FLOAT32_LE)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-d vector, got shape {array.shape}")
    return array.tobytes()


def decode(blob: bytes, dim: int | None = None) -> np.ndarray:
    """Little-endian float32 BLOB -> 1-d float32 array (checked against ``dim`` if given)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected a float32 BLOB, got {type(blob).__name__}")
    if len(blob) % 4:
        raise ValueError(f"a float32 BLOB has a length divisible by 4, this one has {len(blob)} bytes")
    array = np.frombuffer(blob, dtype=FLOAT32_LE)
    if dim is not None and array.shape[0] != dim:
        raise ValueError(f"expected a vector of {dim} floats, got {array.shape[0]}")
    return array.astype(np.float32)


def normalise(matrix: np.ndarray) -> np.ndarray:
    """L2-normalise rows (or a single vector); zero vectors stay zero instead of NaN."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.where(norms == 0, 1, norms)


def unit(vector) -> np.ndarray:
    """One vector -> unit length, without overflow for huge finite values (scaled first, float64)."""
    vector = np.asarray(vector, np.float64)
    largest = float(np.abs(vector).max()) if vector.size else 0.0
    return normalise(vector / largest) if largest > 0 else vector


def combine(weighted) -> np.ndarray:
    """``[(vector, weight), ...]`` -> the weighted sum of the unit vectors, renormalised.

    Ranking by this one vector equals ranking by the weighted sum of cosines, so combined
    text + image search is a single KNN.  ValueError if the terms cancel out.  Only the weights'
    ratios matter, so they are scaled by the largest first (1e300 and 2e300 act as 1 and 2)."""
    weighted = [(vector, float(weight)) for vector, weight in weighted]
    largest = max((abs(weight) for _, weight in weighted), default=0.0)
    if largest == 0:
        raise ValueError("the weighted vectors cancel out (all weights zero?)")
    total = sum((weight / largest) * unit(vector).astype(np.float64) for vector, weight in weighted)
    norm = float(np.linalg.norm(total))
    if norm < 1e-12:
        raise ValueError("the weighted vectors cancel out (all weights zero?)")
    return (total / norm).astype(np.float32)
