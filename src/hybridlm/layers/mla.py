"""Multi-Head Latent Attention (DeepSeek-V2/V3; CORVUS-CORAX section 4).

Keys and values are rebuilt from ONE small latent per token: c_kv = x W_dkv, K = c_kv W_uk,
V = c_kv W_uv. Only the latent and a single decoupled RoPE key are cached, so the cache costs
r + dr numbers per token instead of 2 * nh * d.

RoPE cannot go through the latent (a position-dependent rotation between q and W_uk would stop
W_uk from being folded into the query), so position enters through a separate dr-wide part:
q_rope per head and one k_rope shared by every head. Scores are
(q_nope . k_nope + q_rope . k_rope) / sqrt(d + dr).

Two equivalent ways to attend:
- plain: expand K (B, nh, S, d+dr) and V (B, nh, S, d) from the latent, then attend;
- absorbed (decode, `mla_absorb`): fold W_uk into the query and W_uv into the output, so
  attention runs directly over the cached latent and K/V are never formed.

Glossary: B batch, T new tokens, S cached + new tokens, H hidden, nh heads, d per-head
nope/value dim (H / nh), dr RoPE dim, r kv latent rank, rq query latent rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import segment_mask
from hybridlm.layers.cache_rows import RowLengths, advanced, position_mask, write_rows
from hybridlm.layers.norm import RMSNorm
from hybridlm.layers.rope import RotaryEmbedding, apply_rope
from hybridlm.ops import attention


@dataclass
class MLACache(RowLengths):
    """Preallocated latent cache of one MLA layer; row b holds `lengths[b]` tokens, its token p
    in slot p (see layers/cache_rows.py).

    Holds only what MLA needs to rebuild attention: the normalised latent and the already
    rotated shared RoPE key, side by side in one buffer, [c_kv | k_rope] per token. No
    per-head keys or values. One buffer because absorbed decoding attends with the latent
    as the single key/value head: the key is the whole row (r + dr) and the value its first
    r numbers, both views of the same memory, so one pass over the cache serves both.
    """

    kv: torch.Tensor  # (B, max_len, r+dr): c_kv then k_rope
    reads_key_window = True  # attention reads its slots (a decode step sizes them statically)
    kv_rank: int = 0  # r: the latent's width in `kv`

    def _rows(self) -> torch.Tensor:
        return self.kv

    @property
    def c_kv(self) -> torch.Tensor:
        return self.kv[..., :self.kv_rank]  # (B, max_len, r)

    @property
    def k_rope(self) -> torch.Tensor:
        return self.kv[..., self.kv_rank:]  # (B, max_len, dr)

    def append(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Write c_kv (B, T, r) / k_rope (B, T, dr) at each row's next slots; return every slot
        in use (B, S, r+dr). Rows advance by `input_lengths` (default T)."""
        end = write_rows(self.kv, torch.cat([c_kv, k_rope], dim=-1), self.lengths, 1,
                         "MLA cache", self.key_window)
        self.lengths = advanced(self.lengths, c_kv.shape[1], self.input_lengths)
        return self.kv[:, :end]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention, mixer "L" (a `hybridlm.layers.mixers.Mixer`)."""

    reads_mu = False

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        del layer_idx  # every MLA layer is built alike
        hidden, nh = config.hidden_size, config.num_attention_heads
        self.num_heads = nh
        self.head_dim = d = hidden // nh
        self.kv_rank = r = config.mla_kv_rank
        self.rope_dim = dr = config.mla_rope_dim
        self.q_rank = config.mla_q_rank
        self.absorb = config.mla_absorb
        self.scale = 1.0 / math.sqrt(d + dr)
        eps = config.rms_norm_eps

        q_out = nh * (d + dr)
        if config.mla_q_rank is None:
            self.q_proj = nn.Linear(hidden, q_out, bias=False)
        else:
            self.q_down = nn.Linear(hidden, config.mla_q_rank, bias=False)
            self.q_norm = RMSNorm(config.mla_q_rank, eps)
            self.q_up = nn.Linear(config.mla_q_rank, q_out, bias=False)
        self.kv_down = nn.Linear(hidden, r + dr, bias=False)  # W_dkv and the RoPE key
        self.kv_norm = RMSNorm(r, eps)
        self.k_up = nn.Linear(r, nh * d, bias=False)  # W_uk
        self.v_up = nn.Linear(r, nh * d, bias=False)  # W_uv
        self.o_proj = nn.Linear(nh * d, hidden, bias=False)
        self.rope = RotaryEmbedding(dr, config.rope_theta)

    def non_parameter_flops(self, seq_len: int) -> float:
        """Training FLOPs per token that no parameter accounts for: per head, scores over
        head_dim + rope_dim and the weighted sum over head_dim, for seq_len keys (x 2 for a
        multiply-add, x 3 for forward + backward)."""
        return 6 * self.num_heads * (2 * self.head_dim + self.rope_dim) * seq_len

    def new_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> MLACache:
        width = self.kv_rank + self.rope_dim
        return MLACache(torch.zeros(batch, max_len, width, device=device, dtype=dtype),
                        self.kv_rank)

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        cache: MLACache | None = None,
        mu_prev: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, H), positions (T,) absolute -> (B, T, H). mu_prev is accepted and ignored.
        With a cache whose rows hold different lengths, positions are per row (B, T) and
        masks are per row, as in the GQA mixer.

        segment_ids (B, T): packed rows, as in the GQA mixer (block-diagonal causal mask,
        positions (B, T)); not with a cache."""
        del mu_prev  # same call signature as the GQA mixer; MLA does not read mu
        batch, seq, _ = x.shape
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be used with a cache")
        q_nope, q_rope, c_kv, k_rope = self._project(x, positions)
        kv = cache.append(c_kv, k_rope) if cache is not None else None  # (B, S, r+dr)
        num_keys = seq if kv is None else kv.shape[1]
        mask = (segment_mask(segment_ids) if segment_ids is not None
                else position_mask(positions, num_keys) if positions.dim() == 2
                else None)  # None: bottom-right causal
        # Absorption pays off when K/V would be rebuilt for every cached token at each step,
        # i.e. decoding with a cache; a cacheless full forward uses the plain form.
        if kv is not None and self.absorb:
            y = self._attend_absorbed(q_nope, q_rope, kv, mask)  # (B, nh, T, d)
        else:
            if kv is not None:
                c_kv, k_rope = kv.split([self.kv_rank, self.rope_dim], dim=-1)
            y = self._attend(q_nope, q_rope, c_kv, k_rope, mask)  # (B, nh, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))

    def _project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, H) -> q_nope (B, nh, T, d), q_rope (B, nh, T, dr) rotated,
        c_kv (B, T, r) normalised, k_rope (B, T, dr) rotated."""
        batch, seq, _ = x.shape
        nh, d, dr = self.num_heads, self.head_dim, self.rope_dim
        if self.q_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(batch, seq, nh, d + dr).transpose(1, 2)  # (B, nh, T, d+dr)
        q_nope, q_rope = q.split([d, dr], dim=-1)
        c_kv, k_rope = self.kv_down(x).split([self.kv_rank, dr], dim=-1)  # (B, T, r), (B, T, dr)
        cos, sin = self.rope.cos_sin(positions)  # (T, dr)
        q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        return q_nope, q_rope, self.kv_norm(c_kv), k_rope

    def _attend(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, c_kv: torch.Tensor, k_rope: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plain MLA: rebuild per-head K and V from the latent. Returns (B, nh, T, d).
        mask (B, 1, T, S) bool replaces the causal mask (packed rows)."""
        batch, seq_k, _ = c_kv.shape
        nh, d = self.num_heads, self.head_dim
        k_nope = self.k_up(c_kv).view(batch, seq_k, nh, d).transpose(1, 2)  # (B, nh, S, d)
        v = self.v_up(c_kv).view(batch, seq_k, nh, d).transpose(1, 2)  # (B, nh, S, d)
        k_rope = k_rope.unsqueeze(1).expand(-1, nh, -1, -1)  # (B, nh, S, dr), one key for all
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, nh, T, d+dr)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, nh, S, d+dr)
        # The q/k width (d+dr) may differ from the value width (d).
        return attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _attend_absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Absorbed MLA over the latent cache kv (B, S, r+dr) = [c_kv | k_rope]; K/V are never
        formed. Returns (B, nh, T, d). mask (B, 1, T, S) bool replaces the causal mask, as in
        `_attend`.

        q_nope . (W_uk_h c) = (q_nope W_uk_h) . c, so the query moves into latent space, and
        P (c W_uv_h^T) = (P c) W_uv_h^T, so values are up-projected after attention.
        """
        nh, d, r = self.num_heads, self.head_dim, self.kv_rank
        w_uk = self.k_up.weight.view(nh, d, r)  # (nh, d, r)
        w_uv = self.v_up.weight.view(nh, d, r)  # (nh, d, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, nh, T, r)
        # [q_lat, q_rope] . [c_kv, k_rope] = q_lat.c_kv + q_rope.k_rope in one product: MQA
        # with the latent as the single key/value head shared by all nh heads. The key is the
        # whole cached row and the value its first r numbers (views of one buffer), so the
        # cache is neither copied nor repeated per head.
        q = torch.cat([q_lat, q_rope], dim=-1).to(kv.dtype)  # (B, nh, T, r+dr)
        k = kv.unsqueeze(1)  # (B, 1, S, r+dr)
        o_lat = attention(q, k, k[..., :r], attn_mask=mask, scale=self.scale)  # (B, nh, T, r)
        return torch.einsum("bhtr,hdr->bhtd", o_lat, w_uv)  # (B, nh, T, d)
