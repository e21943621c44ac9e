"""The model: open_clip models and their encoders, image decoding, IIIF derivative URLs, and provenance
(what a ``models`` row says about the weights).  Imports nothing of search/ or web/."""
