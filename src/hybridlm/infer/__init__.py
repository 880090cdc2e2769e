"""Inference: sampling and generation with caches."""
