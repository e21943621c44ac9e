"""Retrieval metrics: recall@k and median rank, and what a random ranking would score.

Why a random baseline: recall@10 of 0.3 means little until one knows that guessing would
give 0.03 (10 of 300 candidates) or 0.5 (10 of 20).

Captions can repeat (the sheets of an atlas share one catalogue record), so a text query
counts as found when *any* image with that exact caption is ranked within k, and
image-to-text ranks the distinct captions.  With r relevant among N candidates, a random
ranking finds one within k with probability 1 - C(N-r, k) / C(N, k) (= k/N when r = 1), and
its best relevant item sits at rank (N + 1) / (r + 1) on average.
"""

from __future__ import annotations

from math import comb

import numpy as np

KS = (1, 5, 10)


def ranks(similarity: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the best relevant candidate per query row.

    ``similarity``, ``relevant``: (queries, candidates); every row has >= 1 relevant."""
    best_relevant = np.where(relevant, similarity, -np.inf).max(axis=1, keepdims=True)
    return 1 + (np.where(relevant, -np.inf, similarity) > best_relevant).sum(axis=1)


def random_recall(n_candidates: int, n_relevant: np.ndarray, k: int) -> float:
    """Expected recall@k of a random ranking, averaged over queries."""
    n = n_candidates
    return float(np.mean([1 - comb(n - r, k) / comb(n, k) if k < n else 1.0 for r in n_relevant]))


def summarise(rank: np.ndarray, ks=KS) -> dict:
    return {**{f"R@{k}": float(np.mean(rank <= k)) for k in ks}, "median_rank": float(np.median(rank))}


def retrieval_metrics(image_vectors: np.ndarray, text_vectors: np.ndarray, captions: list[str], ks=KS) -> dict:
    """Text-to-image and image-to-text metrics for paired unit vectors (row i of each is a pair),
    plus the random baseline, as ``{"text_to_image": {...}, "image_to_text": {...}, "random": {...}}``."""
    unique = sorted(set(captions))
    caption_index = np.array([unique.index(c) for c in captions])
    # One text vector per distinct caption (identical captions embed identically).
    first = [captions.index(c) for c in unique]
    texts = text_vectors[first]
    relevant_t2i = caption_index[None, :] == np.arange(len(unique))[:, None]  # (captions, images)
    t2i = ranks(texts @ image_vectors.T, relevant_t2i)
    i2t = ranks(image_vectors @ texts.T, relevant_t2i.T)
    n_images, n_captions = len(image_vectors), len(unique)
    per_caption = relevant_t2i.sum(axis=1)
    return {
        "text_to_image": summarise(t2i, ks),
        "image_to_text": summarise(i2t, ks),
        "random": {
            "text_to_image": {**{f"R@{k}": random_recall(n_images, per_caption, k) for k in ks},
                              "median_rank": float(np.median((n_images + 1) / (per_caption + 1)))},
            "image_to_text": {**{f"R@{k}": random_recall(n_captions, np.ones(n_images, int), k) for k in ks},
                              "median_rank": (n_captions + 1) / 2},
        },
        "images": n_images,
        "captions": n_captions,
    }


def precision_at_k(image_vectors: np.ndarray, labels: list, query_vector: np.ndarray, label, k: int = 10) -> float:
    """Share of the top-k images for one query vector whose label is ``label``."""
    top = np.argsort(-(image_vectors @ query_vector), kind="stable")[:k]
    return float(np.mean([labels[i] == label for i in top]))
