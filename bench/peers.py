"""The peers: HF transformers modules at hybridlm's sizes, imported lazily.

transformers is no dependency of hybridlm (CI has none): without it every peer cell reads
"n/a" and the hybridlm side still runs. Every builder returns a module in fp32 on `device`;
the benchmark decides dtype and autocast the same way for both sides.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from bench.timing import Measured, attempt

MISSING = "n/a: transformers is not installed"


def transformers_module() -> ModuleType | None:
    try:
        return importlib.import_module("transformers")
    except ImportError:
        return None


def transformers_version() -> str | None:
    module = transformers_module()
    return None if module is None else module.__version__


def peer_attempt(what: str, fn: Callable[[], Measured]) -> tuple[Measured | None, str | None]:
    """`attempt` for a peer: "n/a" without transformers, else the measurement or its error."""
    if transformers_module() is None:
        return None, MISSING
    return attempt(what, fn)


def hf_llama(hidden: int, layers: int, heads: int, kv_heads: int, mlp_width: int, vocab: int,
             max_positions: int, device: torch.device) -> nn.Module:
    """LlamaForCausalLM (tied embeddings, SDPA attention) at the given dimensions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp_width, vocab_size=vocab,
        tie_word_embeddings=True, max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device)


def hf_mixtral_block(hidden: int, expert_width: int, experts: int, top_k: int,
                     implementation: str | None, device: torch.device) -> nn.Module:
    """MixtralSparseMoeBlock; `implementation` picks its expert kernels ("grouped_mm", ...;
    None: the library's default)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=hidden, intermediate_size=expert_width,
                           num_local_experts=experts, num_experts_per_tok=top_k)
    if implementation is not None:
        config._experts_implementation = implementation
    return MixtralSparseMoeBlock(config).to(device)


def hf_mamba_mixer(hidden: int, d_state: int, expand: int, d_conv: int, dt_rank: int,
                   device: torch.device) -> nn.Module:
    """MambaMixer (Mamba-1). Without the mamba_ssm / causal_conv1d packages it runs its
    pure-torch path: a Python loop over time."""
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=hidden, state_size=d_state, expand=expand,
                         conv_kernel=d_conv, time_step_rank=dt_rank, num_hidden_layers=1)
    return MambaMixer(config, layer_idx=0).to(device)
