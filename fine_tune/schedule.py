"""Learning rate: linear warm-up, then cosine decay to zero, stepped once per batch.

Why: the schedule CLIP and open_clip train with.  A warm-up keeps the first updates from
wrecking pretrained weights; a ``LambdaLR`` keeps its state in ``state_dict()`` so a resumed
run continues the same curve.
"""

from __future__ import annotations

import math


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    import torch

    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
