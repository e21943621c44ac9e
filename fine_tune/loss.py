"""CLIP's symmetric contrastive loss, with the model's own learned temperature.

Why its own module: the seed multiplied the similarities by CLIP's learned scale
(``logit_scale.exp()``, ~100 for OpenAI's weights) and then divided by 0.07 again, which made
the softmax ~14x too sharp, one likely cause of its "mixed results".  Here the scale is
applied exactly once, and clamped at 100 as CLIP's training does.
"""

from __future__ import annotations

import math

MAX_LOGIT_SCALE = 100.0


def contrastive_loss(image_features, text_features, logit_scale):
    """Mean of image->text and text->image cross-entropy over a batch of matching pairs.

    ``image_features`` and ``text_features``: (N, D), L2-normalised; row i of each is a pair.
    ``logit_scale``: the multiplier itself, i.e. ``model.logit_scale.exp()`` (not its log).
    logits = logit_scale * image @ text.T; no further temperature.
    """
    import torch
    import torch.nn.functional as F

    logits_per_image = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2


def clamp_logit_scale(model):
    """Keep ``exp(logit_scale)`` in [1, 100], as CLIP does after each optimiser step."""
    import torch

    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
