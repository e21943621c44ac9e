"""The query vector: one builder for every way a search reaches the vectors.

The search service (in-memory index or sqlite-vec) and the ``mapclip_embed_text`` SQL function
both embed text through ``text_vector``, so the prompt template is applied in exactly one place,
and every combination of text, uploaded image and stored map goes through ``combine_terms``,
the same arithmetic as ``mapclip_combine``.
"""

from __future__ import annotations

import numpy as np

from ..settings import settings_of
from ..store import vectors


def prompt(text: str, config: dict) -> str:
    """The text the model reads: the plugin's ``prompt_template`` ("a {} map") around the query."""
    template = settings_of(config).prompt_template or "{}"
    return template.replace("{}", text) if "{}" in template else f"{template} {text}"


def text_vector(encoder, text: str, config: dict) -> np.ndarray:
    """A text query -> its unit vector, with the prompt template applied."""
    return encoder.embed_text(prompt(text, config))


def text_vectors(encoder, texts: list[str], config: dict) -> list[np.ndarray]:
    """Several text queries in one forward pass, each with the prompt template applied."""
    return encoder.embed_texts([prompt(text, config) for text in texts])


# Relevance feedback (Rocchio): the query moves toward the mean of the maps marked "more like
# these" and away from the mean of those marked "fewer like these".  The textbook's weights
# (Manning, Raghavan & Schuetze, Introduction to Information Retrieval, 9.1.1): negative
# feedback counts less than positive, so one wrong mark does not turn the search around.
FEEDBACK_QUERY = 1.0
FEEDBACK_MORE = 0.75
FEEDBACK_FEWER = 0.15


def feedback_terms(query: np.ndarray | None, more: list[np.ndarray], fewer: list[np.ndarray]) -> list:
    """The Rocchio sum as ``[(vector, weight), ...]`` for ``vectors.combine``: each marked map
    weighs its share of the mean (the SQL the page shows lists them the same way)."""
    terms = [(query, FEEDBACK_QUERY)] if query is not None else []
    terms += [(vector, FEEDBACK_MORE / len(more)) for vector in more]
    terms += [(vector, -FEEDBACK_FEWER / len(fewer)) for vector in fewer]
    return terms


def with_feedback(weighted: list[tuple[np.ndarray, float]], more: list[np.ndarray],
                  fewer: list[np.ndarray]) -> np.ndarray:
    """The query's weighted terms, combined, then moved by the feedback (none: unchanged)."""
    query = combine_terms(weighted) if weighted else None
    if not more and not fewer:
        if query is None:
            raise ValueError("the query has no terms")
        return query
    if query is None and not more:
        raise ValueError("fewer needs a query or maps marked more: it only moves a query away")
    return vectors.combine(feedback_terms(query, more, fewer))


def combine_terms(terms: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """``[(vector, weight), ...]`` -> one unit query vector (a single term is only normalised)."""
    if len(terms) == 1 and terms[0][1] > 0:
        return vectors.normalise(terms[0][0])
    return vectors.combine(terms)


# -- fused rankings: the arithmetic the shown SQL repeats (search/sql.py) -----------------------

MIN_DEVIATION = 1e-9  # a term every sampled map matches equally: no division by zero


def term_stats(sample: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's similarity over the sample: (means, standard deviations), as SQL's ``avg``
    computes them (float32 similarities, summed in double)."""
    sims = (sample @ queries.T).astype(np.float64)
    mean = sims.mean(axis=0)
    deviation = np.sqrt(np.maximum((sims * sims).mean(axis=0) - mean * mean, 0))
    return mean, np.maximum(deviation, MIN_DEVIATION)


def standardised_scores(matrix: np.ndarray, queries: np.ndarray, weights: np.ndarray, mean: np.ndarray,
                        deviation: np.ndarray) -> np.ndarray:
    """Each map's fused score: the sum over terms of weight x (similarity - mean) / deviation."""
    sims = (matrix @ queries.T).astype(np.float64)
    return ((sims - mean) / deviation) @ weights


def standardised_bound(thresholds: np.ndarray, weights: np.ndarray, mean: np.ndarray,
                       deviation: np.ndarray) -> float:
    """The best score a map in none of the lists can have (Fagin's threshold): each term's list holds
    every map whose similarity to the signed query (a negative term's is turned round) beats the
    list's last, so an unseen map is at most that last on every term."""
    signs = np.sign(weights)
    return float(np.sum(np.abs(weights) * (thresholds - signs * mean) / deviation))


def rrf_scores(lists: list[tuple[str, float, list[int]]], k: int) -> dict[int, tuple[float, dict]]:
    """Reciprocal rank fusion: map id -> (score, {list name: place}), over maps found in a list
    of positive weight; scores rounded to 12 places as the shown SQL rounds them."""
    totals: dict[int, float] = {}
    ranks: dict[int, dict] = {}
    positive: set[int] = set()
    for name, weight, ids in lists:
        for place, map_id in enumerate(ids, 1):
            map_id = int(map_id)
            totals[map_id] = totals.get(map_id, 0.0) + weight / (k + place)
            ranks.setdefault(map_id, {})[name] = place
            if weight > 0:
                positive.add(map_id)
    return {i: (round(totals[i], 12), ranks[i]) for i in positive}
