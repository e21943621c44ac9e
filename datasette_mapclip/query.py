"""The parameters of one search, as the page and the JSON API both take them.

    q          text ("nautical chart")
    like       id of a map in the collection: its stored vector, no model run
    vector     hex float32 query vector (what an uploaded image becomes, so searches stay shareable)
    weight     text/image slider in [-1, 1]: -1 image only, 0 equal, +1 text only (the seed's convention)
    k, page    results per page (default 20), page number
    year_min, year_max, place, filter    narrow the vector search itself (inside the KNN)
    model      which model's vectors to search, when a database holds more than one
    _db        which database, when Datasette serves several (read by the search service)
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse

from .errors import BadSearch

DEFAULT_K = 20
MAX_K = 200
VEC0_MAX_K = 4096  # sqlite-vec's limit on k: no page of one search reaches past it
# CLIP reads 77 tokens (a few hundred characters); longer text is refused before any tokenising,
# so no request can hold the shared encoder for long.
MAX_QUERY_CHARS = 1000
MAX_FILTER_CHARS = 1000
MAX_ID = 2**63 - 1  # SQLite's largest integer


def _int(args, name, low=None, high=None):
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    if len(raw) > 25:
        raise BadSearch(f"{name} must be a whole number, got {len(raw)} characters")
    try:
        value = int(raw)
    except ValueError:
        raise BadSearch(f"{name} must be a whole number, got {raw!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise BadSearch(f"{name} must be between {low} and {high}, got {value}")
    return value


@dataclasses.dataclass
class SearchParams:
    q: str | None = None
    like: int | None = None
    vector: bytes | None = None
    weight: float = 0.0
    k: int = DEFAULT_K
    page: int = 1
    year_min: int | None = None
    year_max: int | None = None
    place: str | None = None
    filter: str | None = None
    model: str | None = None

    @classmethod
    def from_args(cls, args) -> "SearchParams":
        weight_raw = (args.get("weight") or "").strip()
        try:
            weight = float(weight_raw) if weight_raw else 0.0
        except ValueError:
            raise BadSearch(f"weight must be a number between -1 and 1, got {weight_raw!r}") from None
        if not -1 <= weight <= 1 or math.isnan(weight):
            raise BadSearch(f"weight must be between -1 (image only) and 1 (text only), got {weight}")
        vector_hex = (args.get("vector") or "").strip()
        vector = None
        if vector_hex:
            try:
                vector = bytes.fromhex(vector_hex)
            except ValueError:
                raise BadSearch("vector must be hex-encoded float32 bytes") from None
            if not vector or len(vector) % 4:
                raise BadSearch("vector must be hex-encoded float32 bytes (a multiple of 4 bytes)")
        params = cls(
            q=(args.get("q") or "").strip() or None,
            like=_int(args, "like", 0, MAX_ID),
            vector=vector,
            weight=weight,
            k=_int(args, "k", 1, MAX_K) or DEFAULT_K,
            page=_int(args, "page", 1, VEC0_MAX_K) or 1,
            year_min=_int(args, "year_min", -9999, 9999),
            year_max=_int(args, "year_max", -9999, 9999),
            place=(args.get("place") or "").strip() or None,
            filter=(args.get("filter") or "").strip() or None,
            model=(args.get("model") or "").strip() or None,
        )
        for name, limit in (("q", MAX_QUERY_CHARS), ("filter", MAX_FILTER_CHARS), ("place", MAX_FILTER_CHARS),
                            ("model", MAX_FILTER_CHARS)):
            if len(getattr(params, name) or "") > limit:
                raise BadSearch(f"{name} is too long: {len(getattr(params, name))} characters, limit {limit}")
        if params.k * params.page > VEC0_MAX_K:
            raise BadSearch(f"page {params.page} of {params.k} goes past the {VEC0_MAX_K} nearest maps that one search can reach")
        return params

    @property
    def has_query(self) -> bool:
        return bool(self.q or self.like is not None or self.vector)

    @property
    def has_filters(self) -> bool:
        return any(v not in (None, "") for v in (self.year_min, self.year_max, self.place, self.filter))

    def weights(self) -> tuple[float, float]:
        """(text weight, image weight): the seed's (1+s)/4 and (1-s)/4; renormalised later."""
        return (1 + self.weight) / 4, (1 - self.weight) / 4

    def query_string(self, **changes) -> str:
        values = dataclasses.asdict(self)
        values.update(changes)
        if values.get("vector") is not None:
            values["vector"] = values["vector"].hex()
        defaults = {"weight": 0.0, "k": DEFAULT_K, "page": 1}
        pairs = [(k, v) for k, v in values.items() if v not in (None, "") and defaults.get(k, object()) != v]
        return urllib.parse.urlencode(pairs)
