"""An OpenAI-compatible HTTP server over the continuous-batching engine (`hybridlm serve`).

Needs the optional `serve` extra (fastapi, uvicorn, pydantic): nothing outside this package
imports them, so the rest of hybridlm runs without it."""

from hybridlm.serve.app import build_app

__all__ = ["build_app"]
