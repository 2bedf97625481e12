"""Model backends: one protocol (`base.Backend`), resolved from a model string by `registry.load_backend`."""

from .base import Backend, Completion, GenerationParams
from .registry import load_backend, model_path

__all__ = ["Backend", "Completion", "GenerationParams", "load_backend", "model_path"]
