"""`HybridLMForCausalLM`: a `HybridLM` as an HF transformers causal LM (`PreTrainedModel` +
`GenerationMixin`), so `AutoModelForCausalLM`, `pipeline("text-generation")` and
`model.generate()` work on hybridlm model directories.

Loading and saving stay hybridlm's (`hybridlm.checkpoint`): `from_pretrained` reads
config.json + model.safetensors with every name and shape checked, `save_pretrained` writes
the same layout, so a directory round-trips between both libraries unchanged.

Padding: HybridLM has no attention mask; it has per-row cache lengths instead. A forward with
an `attention_mask` holding zeros packs each row's real tokens to the left, feeds them with
`input_lengths` (each row advances by its real tokens only; positions continue per row) and
puts the logits back at the columns they came from, so a left-padded batch (what `generate`
and pipelines build) gives each row what it gives alone. Logits at padding columns are
meaningless, as in HF models.

Glossary: B batch, T new columns of input_ids, V vocab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import utils as generation_utils
from transformers.modeling_outputs import CausalLMOutputWithPast

from hybridlm.checkpoint import load_weights
from hybridlm.hf.cache import HybridLMCache
from hybridlm.hf.config import HybridLMConfig
from hybridlm.hf.tokenizer import end_of_text
from hybridlm.model import HybridLM, next_token_loss

# Arguments HF passes to `from_pretrained` on the way to a local directory; they name hub
# locations and download policies, which a local hybridlm directory has no use for.
_HUB_ARGUMENTS = {"cache_dir", "force_download", "local_files_only", "proxies", "revision",
                  "token", "trust_remote_code", "code_revision", "_commit_hash", "_from_auto",
                  "_from_pipeline", "use_safetensors", "adapter_kwargs", "low_cpu_mem_usage",
                  "attn_implementation", "subfolder"}

# transformers renamed the cache from `past_key_values` to `cache` (5.2x: the old name is
# deprecated until 5.40): generate() keeps it under this key, and model outputs carry it in
# this field.
CACHE_KWARG = ("cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ())
               else "past_key_values")
OUTPUT_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                      else "past_key_values")


class HybridLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HybridLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, config: HybridLMConfig) -> None:
        super().__init__(config)
        self.model = HybridLM(config.to_model_config())  # initialised by hybridlm itself
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: HybridLM initialises its own weights, and loading replaces them."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    # --- files: hybridlm's layout --------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *model_args: Any,
                        config: HybridLMConfig | None = None, dtype: Any = None,
                        device_map: Any = None, **kwargs: Any) -> HybridLMForCausalLM:
        """A hybridlm model directory (config.json + model.safetensors) -> the model in eval
        mode. `dtype` (a torch dtype or "auto": as saved) and `device_map` (one device) as
        in HF; hub-only arguments are accepted and unused (the directory is local)."""
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            raise ValueError(f"hybridlm models load from a local model directory; "
                             f"{str(directory)!r} is not one")
        dtype = kwargs.pop("torch_dtype", dtype)
        if kwargs.get("subfolder"):
            raise ValueError(f"subfolder={kwargs['subfolder']!r}: pass the model directory "
                             "itself")
        unknown = sorted(k for k, v in kwargs.items() if k not in _HUB_ARGUMENTS and v)
        if model_args or unknown:
            raise ValueError(f"HybridLMForCausalLM.from_pretrained does not take "
                             f"{unknown or list(model_args)}; allowed: config, dtype, "
                             "device_map (one device)")
        if config is None:
            config = HybridLMConfig.from_pretrained(directory)
        model = cls(config)
        load_weights(model.model, directory)  # every tensor name and shape checked
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        elif dtype not in (None, "auto"):
            raise ValueError(f"dtype={dtype!r}: allowed a torch.dtype, 'auto' or None")
        if device_map is not None:
            if not isinstance(device_map, str | torch.device | int) or device_map in (
                    "auto", "balanced", "balanced_low_0", "sequential"):
                raise ValueError(f"device_map={device_map!r}: a hybridlm model loads onto one "
                                 "device; pass its name ('cpu', 'cuda', 'cuda:1')")
            model.to(device_map)
        # generation stops at the end-of-text token, as `hybridlm generate` does; rows that
        # stopped are padded with it
        _, eos_id = end_of_text(directory)
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = eos_id
        model.name_or_path = str(directory)
        config._name_or_path = str(directory)
        return model.eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Write config.json + model.safetensors in hybridlm's layout (readable by
        `HybridLM.from_pretrained`, `hybridlm generate` and this class alike)."""
        unknown = sorted(k for k, v in kwargs.items() if v and k != "safe_serialization")
        if unknown:
            raise ValueError(f"save_pretrained does not take {unknown}: it writes a local "
                             "hybridlm model directory")
        self.model.config = self.config.to_model_config()
        self.model.save_pretrained(save_directory)

    # --- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: HybridLMCache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) continue `past_key_values` (`cache` from transformers 5.2x on;
        None: a new sequence) -> logits
        (B, T, V) (the last `logits_to_keep` columns when > 0), the loss when `labels`
        (B, T) are given (-100 = ignored, shifted inside), and the cache when `use_cache`.
        attention_mask (B, S) covers the cached columns and these (1 token, 0 padding)."""
        renamed = kwargs.pop("cache", None)  # the name transformers uses since 5.2x
        past_key_values = past_key_values if past_key_values is not None else renamed
        self._refuse_unsupported(input_ids, kwargs)
        if past_key_values is not None and not isinstance(past_key_values, HybridLMCache):
            raise ValueError(f"past_key_values must be a HybridLMCache (hybridlm's own caches), "
                             f"got {type(past_key_values).__name__}")
        batch, columns = input_ids.shape
        real = None if attention_mask is None else attention_mask[:, -columns:].to(torch.bool)
        padded = real is not None and not bool(real.all())
        cache = past_key_values
        if cache is None and (use_cache or padded):  # padding is skipped through a cache
            capacity = self.config.max_position_embeddings if use_cache else columns
            cache = self.new_cache(batch, capacity)
        if padded:
            logits = self._forward_packed(input_ids, real, cache)
        else:
            model_cache = cache.model_cache if cache is not None else None
            logits = self.model(input_ids, cache=model_cache).logits  # (B, T, V)
        if cache is not None:
            cache.columns_seen += columns
        loss = None if labels is None else next_token_loss(logits, labels)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{OUTPUT_CACHE_FIELD: cache if use_cache else None})

    def _forward_packed(self, input_ids: torch.Tensor, real: torch.Tensor,
                        cache: HybridLMCache) -> torch.Tensor:
        """input_ids (B, T) with real (B, T) bool marking tokens -> logits (B, T, V): each
        row's tokens moved to its front (in order), fed with input_lengths, and the logits
        moved back to the columns the tokens came from."""
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # tokens first (B, T)
        packed = input_ids.gather(1, order)  # (B, T), row b's tokens in its first n_b columns
        lengths = real.sum(dim=1)  # (B,)
        logits = self.model(packed, cache=cache.model_cache, input_lengths=lengths).logits
        out = torch.empty_like(logits)
        out.scatter_(1, order[:, :, None].expand_as(logits), logits)  # back to input columns
        return out

    @staticmethod
    def _refuse_unsupported(input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
        if input_ids is None:
            raise ValueError("HybridLMForCausalLM needs input_ids (inputs_embeds is not "
                             "supported)")
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unsupported:
            raise ValueError(f"HybridLMForCausalLM.forward does not support {unsupported}; "
                             "allowed: input_ids, attention_mask, past_key_values, use_cache, "
                             "labels, logits_to_keep")

    # --- generation ----------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> HybridLMCache:
        """An empty cache of `batch` rows of `capacity` tokens (every mixer's own state)."""
        return HybridLMCache(self.model.new_cache(batch, capacity), capacity)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict,
                                      generation_mode, batch_size: int,
                                      max_cache_length: int) -> None:
        """generate(): a HybridLMCache sized for the prompt + max_new_tokens (HF would
        otherwise build a DynamicCache, which HybridLM cannot fill)."""
        if model_kwargs.get(CACHE_KWARG) is not None or generation_config.use_cache is False:
            return
        if generation_config.num_beams > 1:
            raise NotImplementedError(
                f"num_beams={generation_config.num_beams}: beam search reorders cache rows, "
                "which hybridlm's caches do not support; allowed: num_beams=1")
        limit = self.config.max_position_embeddings
        if max_cache_length + 1 > limit:  # + 1: HF passes max_length - 1
            raise ValueError(f"prompt + max_new_tokens = {max_cache_length + 1} tokens exceeds "
                             f"max_position_embeddings={limit}")
        rows = batch_size * max(generation_config.num_return_sequences or 1, 1)
        model_kwargs[CACHE_KWARG] = self.new_cache(rows, max_cache_length)
