"""The families `hybridlm convert` knows, and how a checkpoint or a model finds its own.

From HF: by config.model_type. To HF: the stack-wide refusals first (parts no HF
architecture has), then the one family whose layout the model's layers fit.
"""

from __future__ import annotations

from hybridlm.config import ModelConfig
from hybridlm.convert import llama, mamba, mixtral, qwen3
from hybridlm.convert.common import ConvertError, Family

FAMILIES: tuple[Family, ...] = (llama.FAMILY, qwen3.FAMILY, mixtral.FAMILY, mamba.FAMILY)


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    known = [f.model_type for f in FAMILIES]
    raise ConvertError(f"config model_type={model_type!r} is not supported; hybridlm convert "
                       f"reads {known}")


def _stack_refusals(config: ModelConfig) -> list[str]:
    """Parts of a hybridlm model that no HF architecture here has, each with its reason."""
    c, why = config, []
    mixers, mlps = set(c.layer_mixers), set(c.layer_mlps)
    if c.mu_guidance and "A" in mixers:
        why.append("mu guidance (mu_guidance=True): q/k/v read the previous attention layer's "
                   "mu, which no HF architecture computes")
    if c.pid_scaler:
        why.append("PiD scaler (pid_scaler=True): HF blocks add their residual unscaled")
    if c.activation_clamp is not None:
        why.append(f"activation_clamp={c.activation_clamp}: HF blocks do not clamp")
    if "T" in mlps:
        why.append("token routing (mlp letter T): an expert chosen by the token id has no HF "
                   "counterpart")
    if "L" in mixers:
        why.append("MLA (mixer letter L): no plain HF counterpart here (DeepSeek's stacks "
                   "differ in more than the mixer)")
    if "E" in mlps and c.num_shared_experts > 0:
        why.append(f"shared experts (num_shared_experts={c.num_shared_experts}): Mixtral has "
                   "none")
    if "E" in mlps:
        why.extend(mixtral.refusals(c))
    unknown = mixers - {"A", "M", "L"} | mlps - {"D", "E", "N", "T"}
    if unknown:
        why.append(f"layers of registered letters {sorted(unknown)}: no HF counterpart known")
    return why


def family_for_config(config: ModelConfig) -> Family:
    """The HF family of a hybridlm model, or a one-line ConvertError giving every reason."""
    why = _stack_refusals(config)
    if not why:
        for family in FAMILIES:
            if family.fits(config):
                return family
        why.append(f"layout mixer_pattern={config.mixer_pattern!r}, "
                   f"mlp_pattern={config.mlp_pattern!r}: HF counterparts are all-A with all-D "
                   "(Llama, or Qwen3 with attn_qk_norm) or all-E (Mixtral), and all-M with "
                   "all-N (Mamba)")
    raise ConvertError("this model has no HF counterpart: " + "; ".join(why))
