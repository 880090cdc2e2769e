"""The mixer contract (`Mixer`), the built-in mixers' registry entries, and `build_mixer`.

A block's mixer is the part that moves information between tokens (attention, MLA, an SSM).
Every mixer follows `Mixer`; `mixer_pattern` letters name them through
`hybridlm.registry`. Adding a mixer = one file with its class + one `register_mixer`
line (here for a built-in, or in your own code before the config is made).

Glossary: B batch, T new tokens, H hidden.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from hybridlm.config import ModelConfig
from hybridlm.layers.attention import Attention
from hybridlm.layers.mamba import Mamba
from hybridlm.layers.mla import MultiHeadLatentAttention
from hybridlm.registry import mixer_entry, register_mixer


@runtime_checkable
class Mixer(Protocol):
    """What `Block` needs of a mixer (an `nn.Module`).

    Constructor: `MixerClass(config: ModelConfig, layer_idx: int)`. Everything the mixer needs
    is read from the config (sizes under the mixer's own prefix: `mla_*`, `mamba_*`, ...);
    layer_idx says which layer it is, for mixers that vary with depth.

    `reads_mu` (class attribute): True when the mixer reads mu guidance. When
    `config.mu_guidance` is on, such a mixer must be given `mu_prev` (B, T, H), and the
    stack keeps a mu stream flowing to it (`block.mu_reading_layers`); a mixer with
    reads_mu = False accepts mu_prev and ignores it.

    `forward(x, *, positions, cache=None, mu_prev=None, segment_ids=None) -> y`:
      x (B, T, H) normalised block input -> y (B, T, H), causal (y at t reads x at <= t only).
      positions (T,) absolute positions of the T tokens, or (B, T) with segment_ids.
      cache: the object `new_cache` returned; x then continues the cached sequence and the
        cache advances by T. Decoding in pieces with a cache gives the full forward's output.
      segment_ids (B, T): packed rows; each example (a run of equal ids) is computed as if
        alone. Never together with a cache (raise ValueError).

    `new_cache(batch, max_len, device, dtype) -> cache`: an empty cache for `batch` sequences
      of up to max_len tokens; the cache has `nbytes()` (its memory, for cache accounting).

    Optional, read where present:
    `non_parameter_flops(seq_len) -> float`: training FLOPs per token (forward + backward)
      that 6 x parameters does not count, e.g. attention scores over seq_len keys; absent: 0
      (Mamba's scan is linear in the length and small next to its projections). The trainer
      adds it to 6 x active parameters for MFU.
    `fp32_parameters` (class attribute, tuple of names): parameters or child modules that
      must reach the forward in fp32 under FSDP mixed precision (Mamba: A_log, D, dt_proj,
      conv1d); see parallel/data_parallel.shard_fsdp.
    """

    reads_mu: ClassVar[bool]

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor,
        cache: Any | None = None,
        mu_prev: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def new_cache(
        self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> Any: ...


# The built-in mixers: letter -> class, in the one table of hybridlm.registry.
register_mixer("A", Attention, "GQA attention (mu-guided when mu_guidance)")
register_mixer("L", MultiHeadLatentAttention, "MLA")
register_mixer("M", Mamba, "Mamba")


def build_mixer(config: ModelConfig, layer_idx: int) -> Mixer:
    """The mixer of layer `layer_idx`, from its letter in config.mixer_pattern."""
    return mixer_entry(config.layer_mixers[layer_idx]).builder(config, layer_idx)


def mixer_reads_mu(letter: str) -> bool:
    return bool(mixer_entry(letter).builder.reads_mu)
