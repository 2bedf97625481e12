"""Model backends: one protocol (`base.Backend`), resolved from a model string by `base.load_backend`."""

from .base import Backend, Completion, GenerationParams, load_backend

__all__ = ["Backend", "Completion", "GenerationParams", "load_backend"]
