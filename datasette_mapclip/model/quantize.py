"""Dynamic int8 for the CPU image tower, with a guard that it still matches fp32.

torch's dynamic quantisation only converts ``nn.Linear``; open_clip's attention keeps its
q/k/v projection as a raw parameter inside ``nn.MultiheadAttention``, so a third of the
matmuls would stay fp32.  Swapping each attention module for an equivalent one built on
``nn.Linear`` lets all of them go int8 (measured on ViT-B-32, 2 cores: 11.9 -> 20 img/s;
see bench/README.md).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class LinearAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (self-attention only) with ``nn.Linear`` projections."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        dim = mha.embed_dim
        self.heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.qkv.bias.copy_(mha.in_proj_bias)
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **kwargs):
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        out = self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def int8_image_tower(visual: nn.Module) -> nn.Module:
    """A dynamically int8-quantised copy of an open_clip image tower (the original is untouched)."""
    tower = copy.deepcopy(visual).float().eval()
    for module in list(tower.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention) and child.in_proj_weight is not None:
                setattr(module, name, LinearAttention(child))
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency here.
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(tower, {nn.Linear}, dtype=torch.qint8)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(-1).min())
