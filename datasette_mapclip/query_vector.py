"""The query vector: one builder for every way a search reaches the vectors.

The search service (in-memory index or sqlite-vec) and the ``mapclip_embed_text`` SQL function
both embed text through ``text_vector``, so the prompt template is applied in exactly one place,
and every combination of text, uploaded image and stored map goes through ``combine_terms``,
the same arithmetic as ``mapclip_combine``.
"""

from __future__ import annotations

import numpy as np

from . import vectors


def prompt(text: str, config: dict) -> str:
    """The text the model reads: the plugin's ``prompt_template`` ("a {} map") around the query."""
    template = config.get("prompt_template") or "{}"
    return template.replace("{}", text) if "{}" in template else f"{template} {text}"


def text_vector(encoder, text: str, config: dict) -> np.ndarray:
    """A text query -> its unit vector, with the prompt template applied."""
    return encoder.embed_text(prompt(text, config))


def text_vectors(encoder, texts: list[str], config: dict) -> list[np.ndarray]:
    """Several text queries in one forward pass, each with the prompt template applied."""
    return encoder.embed_texts([prompt(text, config) for text in texts])


def combine_terms(terms: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """``[(vector, weight), ...]`` -> one unit query vector (a single term is only normalised)."""
    if len(terms) == 1:
        return vectors.normalise(terms[0][0])
    return vectors.combine(terms)
