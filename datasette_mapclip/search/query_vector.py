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
