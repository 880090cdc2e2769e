"""Inference: sampling and generation with caches, and the continuous-batching engine."""
