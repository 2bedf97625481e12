"""Model backends: one protocol (`base.Backend`), resolved from a model string by `base.load_backend`."""

from .base import Backend, GenerationParams, load_backend

__all__ = ["Backend", "GenerationParams", "load_backend"]
