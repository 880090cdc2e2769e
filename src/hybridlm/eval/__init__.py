"""Evaluation of a built model, shared by training, the demo and the CLI."""

from hybridlm.eval.perplexity import evaluate

__all__ = ["evaluate"]
