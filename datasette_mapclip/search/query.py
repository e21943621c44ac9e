"""The parameters of one search, as the page and the JSON API both take them.

    q          text ("nautical chart")
    like       id of a map in the collection: its stored vector, no model run
    vector     hex float32 query vector (what an uploaded image becomes, so searches stay shareable)
    weight     text/image slider in [-1, 1]: -1 image only, 0 equal, +1 text only (the seed's convention)
    term, term_weight    any number of further terms (repeated, in pairs), each with a weight in
               [-1, 1], negatives subtract: text ("compass rose"), ``map:<id>`` (a stored map's
               vector) or ``image:<hex>`` (an uploaded image's vector)
    more, fewer  relevance feedback: comma-separated map ids to move the query toward / away from
               (Rocchio, see ``query_vector.with_feedback``)
    k, page    results per page (default 20), page number
    year_min, year_max, place, filter    narrow the vector search itself (inside the KNN)
    fusion     how a query of several terms is ranked: "average" (the paper's: one query vector,
               the weighted average of the terms'; the default, so links keep their meaning),
               "standardised" (each term's similarity standardised over a fixed sample of the
               collection, then summed by weight) or "rrf" (reciprocal rank fusion of each term's
               nearest maps).  One term ranks the same whichever is chosen.
    rank       "vector" (the default) or "hybrid": reciprocal rank fusion of the CLIP ranking, the
               catalogue's full-text ranking and the printed words' full-text ranking of the text
    model      which model's vectors to search, when a database holds more than one
    _db        which database, when Datasette serves several (read by the search service)
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse

from ..store.ids import MAX_ID, NumberError, map_id, whole_number
from .errors import BadSearch
from .query_vector import FEEDBACK_FEWER, FEEDBACK_MORE, FEEDBACK_QUERY

DEFAULT_K = 20
MAX_K = 200
VEC0_MAX_K = 4096  # sqlite-vec's limit on k: no page of one search reaches past it
# CLIP reads 77 tokens (a few hundred characters); longer text is refused before any tokenising,
# so no request can hold the shared encoder for long.
MAX_QUERY_CHARS = 1000
MAX_FILTER_CHARS = 1000
# Every text term is encoded in one batch of the shared model: the count caps how long one
# request can hold it (12 short texts: about as long as 3 single-text searches on a CPU).
MAX_TERMS = 12
MAX_FEEDBACK = 50  # maps marked "more like these" or "fewer like these", each
FUSIONS = ("average", "standardised", "rrf")
DEFAULT_FUSION = "average"  # what a URL without ``fusion`` means: the paper's vector average
# What the search page's control starts at, chosen by bench/fusion_bench.py (bench/results/fusion.md).
PAGE_FUSION = "rrf"
RANKS = ("vector", "hybrid")


def _int(args, name, low, high):
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return whole_number(raw, low, high)
    except NumberError as error:
        raise BadSearch(f"{name} must be {error}") from None


@dataclasses.dataclass(frozen=True)
class QueryTerm:
    """One weighted part of a query: ``kind`` is "text", "map" (a stored map id) or "image" (a
    vector, hex in URLs, which an uploaded image becomes); a fused ranking's feedback is "maps"
    (("more" or "fewer", map ids): the mean of the marked maps' vectors)."""

    kind: str
    value: str | int | bytes
    weight: float = 1.0

    def as_arg(self) -> str:
        if self.kind == "map":
            return f"map:{self.value}"
        if self.kind == "image":
            return f"image:{self.value.hex()}"
        return self.value

    @classmethod
    def parse(cls, raw: str, weight: float) -> "QueryTerm":
        text = raw.strip()
        prefix, _, rest = text.partition(":")
        # Digits in any script mean an id was meant ("map:²" is a bad id, not the text "map:²").
        if prefix == "map" and rest.strip().isdigit():
            try:
                return cls("map", map_id(rest), weight)
            except NumberError as error:
                raise BadSearch(f"term map:{rest.strip()[:30]} is not a map id: a map id must be {error}") from None
        if prefix == "image" and rest:
            return cls("image", _hex_vector(rest.strip(), "an image term"), weight)
        if not text:
            raise BadSearch("a term is empty: give text, map:<id> or image:<hex vector>")
        if len(text) > MAX_QUERY_CHARS:
            raise BadSearch(f"a term is too long: {len(text)} characters, limit {MAX_QUERY_CHARS}")
        return cls("text", text, weight)


def _hex_vector(raw: str, what: str) -> bytes:
    try:
        vector = bytes.fromhex(raw)
    except ValueError:
        raise BadSearch(f"{what} must be hex-encoded float32 bytes") from None
    if not vector or len(vector) % 4:
        raise BadSearch(f"{what} must be hex-encoded float32 bytes (a multiple of 4 bytes)")
    return vector


def _choice(args, name: str, choices: tuple[str, ...], default: str) -> str:
    raw = (args.get(name) or "").strip()
    if not raw:
        return default
    if raw.lower() not in choices:
        raise BadSearch(f"{name} must be one of {', '.join(choices)}; got {raw[:40]!r}")
    return raw.lower()


def _weight(raw: str, name: str) -> float:
    raw = (raw or "").strip()
    if not raw:
        return 1.0
    try:
        weight = float(raw[:40])
    except ValueError:
        raise BadSearch(f"{name} must be a number between -1 and 1, got {raw[:40]!r}") from None
    if math.isnan(weight) or not -1 <= weight <= 1:
        raise BadSearch(f"{name} must be between -1 and 1, got {raw[:40]}")
    return weight


def _getlist(args, name: str) -> list[str]:
    """Every value of a repeated argument: from Datasette's MultiParams, or a dict of lists."""
    if hasattr(args, "getlist"):
        return list(args.getlist(name))
    value = args.get(name)
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def first_value(args, name: str):
    """The first value of an argument (Datasette's MultiParams, a form's dict, or a dict of lists)."""
    values = _getlist(args, name)
    return values[0] if values else None


def _ids(args, name: str) -> tuple[int, ...]:
    raw = (first_value(args, name) or "").strip()
    if not raw:
        return ()
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if len(parts) > MAX_FEEDBACK:
        raise BadSearch(f"{name} lists {len(parts)} maps; at most {MAX_FEEDBACK}")
    ids = []
    for part in parts:
        try:
            value = map_id(part)
        except NumberError:
            raise BadSearch(f"{name} must be comma-separated map ids, got {part[:30]!r}") from None
        if value not in ids:
            ids.append(value)
    return tuple(ids)


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
    words: str | None = None  # words printed on the map, as OCR read them (store/words.py)
    model: str | None = None
    fusion: str = DEFAULT_FUSION
    rank: str = "vector"
    terms: tuple[QueryTerm, ...] = ()
    more: tuple[int, ...] = ()
    fewer: tuple[int, ...] = ()

    @classmethod
    def from_args(cls, args) -> "SearchParams":
        """``args``: Datasette's ``request.args`` (repeated ``term``s kept), or a plain dict."""
        if hasattr(args, "getlist"):
            single = {key: first_value(args, key) for key in args.keys()}
        else:
            single = {key: (first_value(args, key) if isinstance(value, (list, tuple)) else value)
                      for key, value in args.items()}
        params = cls._from_single(single)
        params.terms = _terms(args)
        params.more, params.fewer = _ids(args, "more"), _ids(args, "fewer")
        if set(params.more) & set(params.fewer):
            raise BadSearch("a map cannot be in both more and fewer")
        return params

    @classmethod
    def _from_single(cls, args) -> "SearchParams":
        weight_raw = (args.get("weight") or "").strip()
        try:
            weight = float(weight_raw) if weight_raw else 0.0
        except ValueError:
            raise BadSearch(f"weight must be a number between -1 and 1, got {weight_raw!r}") from None
        if not -1 <= weight <= 1 or math.isnan(weight):
            raise BadSearch(f"weight must be between -1 (image only) and 1 (text only), got {weight}")
        vector_hex = (args.get("vector") or "").strip()
        vector = _hex_vector(vector_hex, "vector") if vector_hex else None
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
            words=(args.get("words") or "").strip() or None,
            model=(args.get("model") or "").strip() or None,
            fusion=_choice(args, "fusion", FUSIONS, DEFAULT_FUSION),
            rank=_choice(args, "rank", RANKS, "vector"),
        )
        for name, limit in (("q", MAX_QUERY_CHARS), ("filter", MAX_FILTER_CHARS), ("place", MAX_FILTER_CHARS),
                            ("words", MAX_FILTER_CHARS), ("model", MAX_FILTER_CHARS)):
            if len(getattr(params, name) or "") > limit:
                raise BadSearch(f"{name} is too long: {len(getattr(params, name))} characters, limit {limit}")
        if params.year_min is not None and params.year_max is not None and params.year_min > params.year_max:
            raise BadSearch(f"the years are the wrong way round: from {params.year_min} to {params.year_max}; "
                            f"swap them (from {params.year_max} to {params.year_min})")
        if params.k * params.page > VEC0_MAX_K:
            raise BadSearch(f"page {params.page} of {params.k} goes past the {VEC0_MAX_K} nearest maps that one search can reach")
        return params

    @property
    def has_query(self) -> bool:
        return bool(self.q or self.like is not None or self.vector or self.terms or self.more)

    @property
    def is_simple(self) -> bool:
        """The paper's case: one text and/or one image (the slider), no further terms, no feedback."""
        return not (self.terms or self.more or self.fewer)

    def all_terms(self) -> list[QueryTerm]:
        """Every term of the query in order: the simple case's text and image first (the slider
        splitting a weight of 1 between them, the seed's ratio), then the further terms."""
        image = (QueryTerm("image", self.vector) if self.vector is not None
                 else QueryTerm("map", self.like) if self.like is not None else None)
        first = [t for t in (QueryTerm("text", self.q) if self.q else None, image) if t is not None]
        if len(first) == 2:
            text_weight, image_weight = self.weights()
            first = [dataclasses.replace(first[0], weight=2 * text_weight),
                     dataclasses.replace(first[1], weight=2 * image_weight)]
        return first + list(self.terms)

    @property
    def has_filters(self) -> bool:
        return any(v not in (None, "") for v in (self.year_min, self.year_max, self.place, self.filter, self.words))

    def fused_terms(self) -> list[QueryTerm]:
        """The terms a fused ranking ranks by, each with its weight (terms weighing 0 left out): the
        query's terms, then the feedback's marked maps as terms of their own with Rocchio's weights
        (the query's terms share ``FEEDBACK_QUERY`` between them)."""
        terms = [t for t in self.all_terms() if t.weight != 0]
        if self.more or self.fewer:
            total = sum(abs(t.weight) for t in terms) or 1.0
            terms = [dataclasses.replace(t, weight=FEEDBACK_QUERY * t.weight / total) for t in terms]
            # each set of marks is one term, the direction of its maps' mean (Rocchio's): at most two
            # more lists however many maps are marked
            terms += [QueryTerm("maps", ("more", self.more), FEEDBACK_MORE)] if self.more else []
            terms += [QueryTerm("maps", ("fewer", self.fewer), -FEEDBACK_FEWER)] if self.fewer else []
        return terms

    @property
    def is_fused(self) -> bool:
        """Whether a fused ranking runs: asked for, and two or more terms with a positive one among
        them (one term ranks the same by every method, so it keeps the plain search)."""
        if self.fusion == "average":
            return False
        terms = self.fused_terms()
        return len(terms) > 1 and any(t.weight > 0 for t in terms)

    def hybrid_text(self) -> str | None:
        """The text whose full-text matches ``rank=hybrid`` fuses: ``q``, else the positive text terms."""
        if self.q:
            return self.q
        return " ".join(t.value for t in self.terms if t.kind == "text" and t.weight > 0) or None

    def weights(self) -> tuple[float, float]:
        """(text weight, image weight): the seed's (1+s)/4 and (1-s)/4; renormalised later."""
        return (1 + self.weight) / 4, (1 - self.weight) / 4

    def query_string(self, **changes) -> str:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values.update(changes)
        if values.get("vector") is not None:
            values["vector"] = values["vector"].hex()
        terms = values.pop("terms") or ()
        for name in ("more", "fewer"):
            values[name] = ",".join(str(i) for i in values[name]) if values[name] else None
        defaults = {"weight": 0.0, "k": DEFAULT_K, "page": 1, "fusion": DEFAULT_FUSION, "rank": "vector"}
        pairs = [(k, v) for k, v in values.items() if v not in (None, "") and defaults.get(k, object()) != v]
        for term in terms:  # in pairs, in order: a form posts its rows the same way
            pairs += [("term", term.as_arg()), ("term_weight", f"{term.weight:g}")]
        return urllib.parse.urlencode(pairs)


def _terms(args) -> tuple[QueryTerm, ...]:
    raw_terms, raw_weights = _getlist(args, "term"), _getlist(args, "term_weight")
    if len(raw_terms) > MAX_TERMS:
        raise BadSearch(f"{len(raw_terms)} terms; at most {MAX_TERMS}")
    if raw_weights and len(raw_weights) != len(raw_terms):
        raise BadSearch(f"{len(raw_terms)} term values but {len(raw_weights)} term_weight values: give one "
                        "weight per term, in the same order (or none: each weighs 1)")
    terms = []
    for i, raw in enumerate(raw_terms):
        if not (raw or "").strip():  # a form row left empty
            continue
        weight = _weight(raw_weights[i] if raw_weights else "", f"term_weight {i + 1}")
        terms.append(QueryTerm.parse(raw, weight))
    return tuple(terms)
