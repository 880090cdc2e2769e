"""Grouped-query attention with QK-norm, RoPE, and optional mu guidance.

Mu-Guided attention (Complexity-Deep eq. 7-10): q/k/v = x W + mu_prev W_mu, computed as ONE
projection of the concatenation [x, mu_prev] (columns [:H] act on x, [H:] on mu_prev).

Glossary: B batch, T new tokens, S cached + new tokens, H hidden, nh query heads,
nkv key/value heads, D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.cache_rows import RowLengths, advanced, position_mask, write_rows
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.rope import RotaryEmbedding, apply_rope, segment_starts
from hybridlm.ops import attention


@dataclass
class KVCache(RowLengths):
    """Preallocated keys/values of one attention layer; row b holds `lengths[b]` tokens, its
    token p in slot p (see layers/cache_rows.py)."""

    k: torch.Tensor  # (B, nkv, max_len, D)
    reads_key_window = True  # attention reads its slots (a decode step sizes them statically)
    v: torch.Tensor  # (B, nkv, max_len, D)

    def _rows(self) -> torch.Tensor:
        return self.k

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, nkv, T, D) at each row's next slots; return the keys/values of every
        slot in use (B, nkv, S, D). Rows advance by `input_lengths` (default T)."""
        end = write_rows(self.k, k, self.lengths, 2, "KV cache", self.key_window)
        write_rows(self.v, v, self.lengths, 2, "KV cache", self.key_window)
        self.lengths = advanced(self.lengths, k.shape[2], self.input_lengths)
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


class Attention(nn.Module):
    """Grouped-query attention, mixer "A" (a `hybridlm.layers.mixers.Mixer`)."""

    reads_mu = True  # mu-guided when config.mu_guidance

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        del layer_idx  # every GQA layer is built alike
        hidden_size, num_heads = config.hidden_size, config.num_attention_heads
        num_kv_heads, eps = config.num_key_value_heads, config.rms_norm_eps
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.use_mu = use_mu = config.mu_guidance
        in_features = hidden_size * (2 if use_mu else 1)
        out_features = (num_heads + 2 * num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(in_features, out_features, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps) if config.attn_qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if config.attn_qk_norm else None
        self.rope = RotaryEmbedding(self.head_dim, config.rope_theta)

    def non_parameter_flops(self, seq_len: int) -> float:
        """Training FLOPs per token that no parameter accounts for: the scores q.k and their
        weighted sum of v over seq_len keys, 2 x 2 x hidden x seq_len forward and twice that
        backward."""
        return 12 * self.num_heads * self.head_dim * seq_len

    def new_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> KVCache:
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype),
                       torch.zeros(shape, device=device, dtype=dtype))

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mu_prev: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, H), positions (T,) absolute, mu_prev (B, T, H) when use_mu -> (B, T, H).
        With a cache whose rows hold different lengths, positions are per row (B, T) and
        each query sees its own row's slots up to its position (`position_mask`).

        segment_ids (B, T): packed rows; a token attends only to earlier tokens of its own
        example (`segment_mask`), and positions are then per row (B, T). No cache with it."""
        batch, seq, _ = x.shape
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be used with a cache")
        if self.use_mu:
            if mu_prev is None:
                raise ValueError("this attention layer is mu-guided: pass mu_prev (B, T, H)")
            x = torch.cat([x, mu_prev.to(x.dtype)], dim=-1)  # (B, T, 2H)
        qkv = self.qkv_proj(x)
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
        q = q.view(batch, seq, nh, d).transpose(1, 2)  # (B, nh, T, D)
        k = k.view(batch, seq, nkv, d).transpose(1, 2)  # (B, nkv, T, D)
        v = v.view(batch, seq, nkv, d).transpose(1, 2)  # (B, nkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rope.cos_sin(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, S, D)
        if segment_ids is not None:
            mask = segment_mask(segment_ids)
        elif positions.dim() == 2:  # rows at different lengths: each its own causal window
            mask = position_mask(positions, k.shape[2])
        else:
            mask = None  # causal, aligned with the cache by ops.attention
        y = attention(q, k, v, attn_mask=mask)  # (B, nh, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, nh * d))


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask of packed rows: segment_ids (B, T) -> (B, 1, T, T) bool,
    True = attend. Query t sees key s <= t of the same example (a new example begins wherever
    the id changes, see `segment_starts`)."""
    seq = segment_ids.shape[1]
    example = segment_starts(segment_ids).cumsum(dim=1)  # (B, T): running example number
    same = example[:, :, None] == example[:, None, :]  # (B, T, T)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]
