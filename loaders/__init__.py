"""Loader commands and the embedding pipeline: source -> fetch -> decode -> embed -> store."""
