"""`HybridLMCache`: hybridlm's own `ModelCache` behind HF transformers' `Cache` interface.

HF's `generate` only needs three things of a cache: that the model's forward returns it as
`past_key_values` and takes it back on the next step, and `get_seq_length()` (the columns of
input_ids it has consumed, left padding included, to slice the next step's input). Everything
else is hybridlm's: every layer keeps its mixer's own cache (GQA keys/values, the MLA latent
cache, the Mamba conv/SSM state) with per-row lengths, so a left-padded batch decodes each row
from its own position (see modeling.py).

Beam search, assisted decoding and cache cropping rearrange or roll back states; a Mamba state
cannot be rolled back and hybridlm's caches have no row reordering, so those refuse with a
clear error instead of decoding wrongly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from hybridlm.model import ModelCache


class HybridLMCache(Cache):
    is_compileable = False
    is_croppable = False

    def __init__(self, model_cache: ModelCache, capacity: int) -> None:
        super().__init__(layers=[])  # no HF layers: the states live in model_cache
        self.model_cache = model_cache
        self.capacity = capacity  # slots per row (tokens each row can hold)
        self.columns_seen = 0  # columns of input_ids fed so far, padding included

    def __len__(self) -> int:
        return len(self.model_cache.layers)

    def __repr__(self) -> str:
        return (f"HybridLMCache(layers={len(self)}, capacity={self.capacity}, "
                f"lengths={self.model_cache.lengths.tolist()})")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns_seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def _refuse(self, what: str) -> None:
        raise NotImplementedError(
            f"HybridLMCache does not support {what} (beam search, assisted or contrastive "
            "decoding): hybridlm's caches cannot reorder or roll back rows (a Mamba state has "
            "no history to roll back to); use greedy decoding or sampling (num_beams=1)")

    def reorder_cache(self, beam_idx) -> None:
        self._refuse("reorder_cache")

    def crop(self, tokens_to_remove: int) -> None:
        self._refuse("crop")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse("batch_repeat_interleave")

    def batch_select_indices(self, indices) -> None:
        self._refuse("batch_select_indices")

    def reset(self) -> None:
        rows = self.model_cache.lengths.shape[0]
        self.model_cache.reset_rows(torch.arange(rows, device=self.model_cache.lengths.device))
        self.columns_seen = 0
