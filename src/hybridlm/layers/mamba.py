"""Mamba-1 mixer: a selective state-space layer (Gu & Dao 2023), pure PyTorch.

    x, z  = in_proj(x)                       two (B, T, Din) halves
    x     = silu(causal depthwise conv1d(x))  kernel d_conv over time, per channel
    dt, B, C = x_proj(x)                     input-dependent SSM parameters
    delta = softplus(dt_proj(dt))            (B, T, Din), per channel step size
    y     = selective_scan(x, delta, A = -exp(A_log), B, C, D)
    out   = out_proj(y * silu(z))

Unlike attention, the cache has a fixed size whatever the sequence length: the last d_conv - 1
conv inputs and the (Din, N) SSM state per sequence.

Glossary: B batch, T new tokens, H hidden, Din inner width (expand * H), N state size per
channel, R dt rank, K conv width (d_conv).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import ModelConfig
from hybridlm.layers.cache_rows import RowLengths, advanced
from hybridlm.layers.rope import segment_starts
from hybridlm.ops import selective_scan, selective_scan_step

DT_MIN, DT_MAX = 0.001, 0.1  # range of the initial step sizes softplus(dt_proj.bias)
DT_FLOOR = 1e-4  # smallest initial step (as mamba_ssm's dt_init_floor)


@dataclass
class MambaCache(RowLengths):
    """Recurrent state of one Mamba layer; row b has read `lengths[b]` tokens.

    A call may feed right-padded rows (`input_lengths`, see layers/cache_rows.py): each row's
    conv and SSM state then stop at its last real token, as if the padding were never fed."""

    conv_state: torch.Tensor  # (B, Din, K - 1): the last inputs of the depthwise conv
    ssm_state: torch.Tensor  # (B, Din, N), fp32

    def _rows(self) -> torch.Tensor:
        return self.ssm_state

    def reset_rows(self, rows: torch.Tensor) -> None:
        """Empty rows (R,) long: length 0 and zero conv/SSM state, as a new cache's rows."""
        super().reset_rows(rows)
        rows = rows.to(self.ssm_state.device)
        self.conv_state.index_fill_(0, rows, 0)
        self.ssm_state.index_fill_(0, rows, 0)

    def nbytes(self) -> int:
        return (self.conv_state.numel() * self.conv_state.element_size()
                + self.ssm_state.numel() * self.ssm_state.element_size())


class Mamba(nn.Module):
    """Mamba-1 selective SSM, mixer "M" (a `hybridlm.layers.mixers.Mixer`)."""

    reads_mu = False
    # Kept in fp32 under FSDP mixed precision: the decays exp(delta * A) move with bf16
    # rounding of A_log, D and dt_proj; conv1d is read directly by the forward, which casts it.
    fp32_parameters = ("A_log", "D", "dt_proj", "conv1d")

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        del layer_idx  # every Mamba layer is built alike
        hidden = config.hidden_size
        self.inner = inner = config.mamba_inner_size
        self.d_state = n = config.mamba_d_state
        self.d_conv = k = config.mamba_d_conv
        self.dt_rank = r = config.mamba_dt_rank_size
        self.chunk_size = config.mamba_chunk_size

        self.in_proj = nn.Linear(hidden, 2 * inner, bias=False)
        # Depthwise (groups=Din); causal padding is applied in forward, not by the module.
        self.conv1d = nn.Conv1d(inner, inner, k, groups=inner, bias=True)
        self.x_proj = nn.Linear(inner, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, inner, bias=True)
        self.out_proj = nn.Linear(inner, hidden, bias=False)
        # A = -exp(A_log) keeps every decay exp(delta * A) in (0, 1). A_log and D are not
        # weights to shrink: the optimizer skips weight decay on them (D is 1-D; A_log is
        # 2-D, hence the explicit mark).
        self.A_log = nn.Parameter(torch.empty(inner, n))  # (Din, N)
        self.D = nn.Parameter(torch.empty(inner))  # (Din,)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SSM-specific init of mamba_ssm (S4D-real A, dt range, D = 1).

        Touches only A_log, D and dt_proj, so it can run after a generic init of the Linear
        layers and override it where Mamba needs more than normal(0, std).
        """
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)  # (N,): A = -[1..N]
        self.A_log.copy_(torch.log(a).expand(self.inner, -1))
        self.D.fill_(1.0)
        # dt_proj's output starts small so delta = softplus(bias) dominates at init.
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        # dt log-uniform in [DT_MIN, DT_MAX]; the bias is its inverse softplus
        # log(exp(dt) - 1) = dt + log(1 - exp(-dt)), written stably with expm1.
        log_dt = torch.rand(self.inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = torch.exp(log_dt).clamp(min=DT_FLOOR)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def new_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> MambaCache:
        del max_len  # the state has a fixed size, whatever the sequence length
        return MambaCache(
            torch.zeros(batch, self.inner, self.d_conv - 1, device=device, dtype=dtype),
            torch.zeros(batch, self.inner, self.d_state, device=device, dtype=torch.float32),
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        cache: MambaCache | None = None,
        mu_prev: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H). With `cache`, x continues the cached sequence and the cache
        advances by T (by cache.input_lengths (B,) for right-padded rows). positions and
        mu_prev are accepted and ignored (same call signature as the attention mixers; order is
        implicit in the recurrence and Mamba does not read mu).

        segment_ids (B, T): packed rows. Each example runs as if alone: the conv sees no input
        of another example and the SSM state restarts at each example's first token. No cache
        with it."""
        del positions, mu_prev
        seq = x.shape[1]
        starts = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a cache")
            starts = segment_starts(segment_ids)  # (B, T) bool
        xs, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, Din) each
        conv = (self._conv(xs.transpose(1, 2), cache) if segment_ids is None
                else self._segment_conv(xs.transpose(1, 2), starts))
        xs = F.silu(conv).transpose(1, 2)  # (B, T, Din)
        dt, b, c = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        # Step sizes and A in fp32: exp(delta * A) is sensitive to rounding in low precision.
        delta = F.softplus(self._fp32_dt_proj(dt))  # (B, T, Din)
        if cache is not None and cache.input_lengths is not None:
            delta = self._freeze_on_padding(delta, cache.input_lengths)
        a = -torch.exp(self.A_log.float())  # (Din, N)
        if cache is not None and seq == 1:
            y, h = selective_scan_step(cache.ssm_state, xs[:, 0], delta[:, 0], a, b[:, 0],
                                       c[:, 0], self.D)
            y = y[:, None]  # (B, 1, Din)
        else:
            h0 = cache.ssm_state if cache is not None else None
            y, h = selective_scan(xs, delta, a, b, c, self.D, h0, self.chunk_size,
                                  reset=starts)
        if cache is not None:
            cache.ssm_state.copy_(h.detach())
            cache.lengths = advanced(cache.lengths, seq, cache.input_lengths)
        return self.out_proj(y * F.silu(z))

    def _fp32_dt_proj(self, dt: torch.Tensor) -> torch.Tensor:
        """dt (B, T, R) -> dt_proj(dt) (B, T, Din) float32 whatever the surrounding autocast
        says. Under FSDP mixed precision dt_proj, A_log and D stay fp32 (see shard_fsdp)."""
        with torch.autocast(device_type=dt.device.type, enabled=False):
            weight, bias = self.dt_proj.weight.float(), self.dt_proj.bias.float()
            return F.linear(dt.float(), weight, bias)

    def _conv_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1d's weight (Din, 1, K) and bias (Din,) in the activations' dtype. They may be
        stored wider (FSDP keeps them in Mamba's fp32 group); the conv itself runs, as the
        projections do, in the activation dtype."""
        return self.conv1d.weight.to(dtype), self.conv1d.bias.to(dtype)

    def _conv(self, x: torch.Tensor, cache: MambaCache | None) -> torch.Tensor:
        """Causal depthwise conv over time: x (B, Din, T) -> (B, Din, T).

        Output t sees inputs t-K+1 .. t. Without a cache the missing past is zeros; with one it
        is the cached last K-1 inputs, which are then replaced by the newest K-1.
        """
        past = self.d_conv - 1
        if cache is None:
            x = F.pad(x, (past, 0))  # (B, Din, K-1+T)
        else:
            x = torch.cat([cache.conv_state.to(x.dtype), x], dim=-1)  # (B, Din, K-1+T)
            cache.conv_state.copy_(self._last_conv_inputs(x, cache.input_lengths).detach())
        weight, bias = self._conv_params(x.dtype)
        return F.conv1d(x, weight, bias, groups=self.inner)

    def _last_conv_inputs(self, x: torch.Tensor, input_lengths: torch.Tensor | None
                          ) -> torch.Tensor:
        """x (B, Din, K-1+T): cached past + new inputs -> the conv state after the call
        (B, Din, K-1): the K-1 inputs before each row's end (T, or input_lengths[b] for a
        right-padded row, so padding never enters the state)."""
        past = self.d_conv - 1
        if input_lengths is None:
            return x[:, :, x.shape[-1] - past:]
        slots = input_lengths[:, None] + torch.arange(past, device=x.device)  # (B, K-1)
        return x.gather(2, slots[:, None, :].expand(-1, x.shape[1], -1))

    @staticmethod
    def _freeze_on_padding(delta: torch.Tensor, input_lengths: torch.Tensor) -> torch.Tensor:
        """delta (B, T, Din) with zero steps at each row's padded tokens (t >= input_lengths):
        a zero step decays nothing (exp(0 * A) = 1) and adds nothing (0 * B * x), so the SSM
        state carries the row's last real token through the padding unchanged."""
        real = torch.arange(delta.shape[1], device=delta.device) < input_lengths[:, None]
        return delta * real[:, :, None].to(delta.dtype)  # (B, T, Din)

    def _segment_conv(self, x: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The causal depthwise conv of packed rows: x (B, Din, T), starts (B, T) bool ->
        (B, Din, T). Output t sums w_j * x_{t-s} over the lags s < K whose input lies in t's
        own example, which equals `_conv` of each example alone (missing past = zeros)."""
        seq = x.shape[-1]
        weight, bias = self._conv_params(x.dtype)
        weight = weight[:, 0]  # (Din, K); tap K-1 multiplies the current input
        example = starts.cumsum(dim=1)  # (B, T): running example number
        out = x * weight[:, -1:]
        for lag in range(1, min(self.d_conv, seq)):
            same = (example[:, lag:] == example[:, :-lag]).to(x.dtype)  # (B, T - lag)
            shifted = x[:, :, :-lag] * same[:, None]  # x_{t-lag}, kept only in t's example
            out = out + F.pad(shifted * weight[:, -1 - lag, None], (lag, 0))
        return out + bias[:, None]
