"""Multi-head self-attention: one fused qkv projection, two paths in one forward.

The fused path (`F.scaled_dot_product_attention`) is fast; the explicit path computes the
softmax itself so it can return the attention weights for visualisation. Both give the
same output.

`num_queries=n` computes the output of the first n tokens only (they still attend to every
token): the model's last block needs nothing else under class-token pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False, num_queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        if num_queries is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, C)
        else:
            q, k, v = self.project_few_queries(x, num_queries)
        M = q.shape[1]  # output tokens: N, or num_queries
        # Per-head views with the strides of timm's reshape-permute-unbind.
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        attn = None
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )  # (B, nh, M, hs)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, M, N)
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v  # (B, nh, M, hs)
        x = x.transpose(1, 2).reshape(B, M, C)  # (B, M, C)
        return self.proj_drop(self.proj(x)), attn

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)

    def project_few_queries(self, x: torch.Tensor, n: int):
        """q for the first n tokens, k and v for all, (B, n or N, C): slices of the one qkv
        weight, so the state dict is unchanged and the rows computed equal the full ones."""
        C = x.shape[-1]
        w_q, w_kv = self.qkv.weight.split([C, 2 * C])
        b_q, b_kv = (None, None) if self.qkv.bias is None else self.qkv.bias.split([C, 2 * C])
        k, v = F.linear(x, w_kv, b_kv).chunk(2, dim=-1)
        return F.linear(x[:, :n], w_q, b_q), k, v
