"""The one attention function of minibldm. A port to another runtime replaces this file only."""
import torch
import torch.nn.functional as F
from einops import rearrange


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v per head.

    q: (B, Tq, C), k and v: (B, Tk, C) with C = heads * d. Returns (B, Tq, C).
    """
    q, k, v = (rearrange(x, "b t (h d) -> b h t d", h=heads) for x in (q, k, v))  # (B, h, T, d)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return rearrange(out, "b h t d -> b t (h d)")
