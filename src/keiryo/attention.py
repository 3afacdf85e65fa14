"""Self-attention with query, key and value in one `qkv` Linear and an int head count: the one forward that
keiryo's reference transformer (`models.Attention`) and its fused BERT attention (`hf.FusedSelfAttention`)
share.

The head size is read from `qkv` at every call, so a module using it keeps working after pruning removes
whole heads or head dimensions (set its `num_heads` to the new count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def qkv_attention(
    qkv: nn.Linear, x: Tensor, num_heads: int, dropout: float = 0.0, mask: Tensor | None = None
) -> Tensor:
    """Scaled dot-product attention of `x` (B, N, D) through a fused `qkv` Linear: (B, N, heads·head_dim).

    `mask` is an additive float mask or a boolean one, broadcast to (B, heads, N, N) as in PyTorch's SDPA.
    """
    b, n, _ = x.shape
    head_dim = qkv.out_features // 3 // num_heads
    q, k, v = qkv(x).reshape(b, n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(b, n, num_heads * head_dim)
