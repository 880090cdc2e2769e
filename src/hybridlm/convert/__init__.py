"""Convert between HF transformers checkpoints and hybridlm model directories.

    hybridlm convert --from-hf HF_DIR --out MODEL_DIR      Llama, Qwen3, Mixtral, Mamba
    hybridlm convert --to-hf MODEL_DIR --out HF_DIR        the same four, where the layers fit

hybridlm's layers compute what these families compute (same outputs on copied weights), so
converting is a matter of names, layouts and config fields. One module per family
(llama.py, qwen3.py, mixtral.py, mamba.py) holds its config and weight mapping; registry.py
lists them. Every HF config field either maps to a hybridlm field, is checked to hold a value
hybridlm computes alike, or is refused by name: nothing is dropped silently.

Only this package imports `transformers` (the optional `hf` extra), and only when a conversion
runs (`require_transformers`), so `import hybridlm` never needs it.
"""

from hybridlm.convert.command import convert_from_hf, convert_to_hf

__all__ = ["convert_from_hf", "convert_to_hf"]
