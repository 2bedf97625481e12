"""Model strings to backends (docs/ARCHITECTURE.md "Model backends"): the one place that imports
the backends, each only when its model string is used (transformers loads with `hf` only).

`embedded` (the default SmolLM2-135M-Instruct) and a local directory or hub id are the `hf`
backend (`hf.py`); `openai:URL#model` an OpenAI-compatible server (`openai.py`); `prompted:<model>`
and `prompted:<context file>#<model>` that model with a context C in front of every request
(`prompted.py`).
"""

from __future__ import annotations

from ..errors import UserError
from .base import Backend


def load_backend(model: str, **options) -> Backend:
    """Resolve a model string to a backend. Options go to the backend (e.g. dtype, batch_size).

    `prompted:<model>` is that model with the built-in context C in front of every request, and
    `prompted:<context file>#<model>` with the context of a file (dialogue prompting, prompted.py).
    """
    if not isinstance(model, str) or not model.strip():
        raise UserError("model: empty model string; use `embedded`, a local model directory, a hub id, or openai:URL#model")
    model = model.strip()
    if model.startswith("prompted:"):  # the model with a context C in front (prompted.py)
        from ..context import load_context
        from .prompted import PromptedBackend, parse_prompted

        context, inner = parse_prompted(model)
        context = load_context(context)  # a bad context file fails before a model is loaded
        return PromptedBackend(load_backend(inner, **options), context, name=model)
    if model.startswith("openai:"):
        from .openai import OpenAIBackend

        return OpenAIBackend(model, **options)
    from .hf import HFBackend

    if model == "embedded":
        from .embedded import embedded_model_dir

        return HFBackend(str(embedded_model_dir()), name="embedded", **options)
    return HFBackend(model, **options)


def model_path(model: str) -> str:
    """The local directory or hub id that transformers/TRL load for a model string (training stages)."""
    model = (model or "").strip()
    if model.startswith("openai:"):
        raise UserError(f"model {model!r}: a server model cannot be fine-tuned here; give a local model directory, a hub id or `embedded`")
    if model.startswith("prompted:"):
        raise UserError(
            f"model {model!r}: a prompted model has no weights of its own to fine-tune; give the plain model "
            "(for context distillation: cai distill with its context setting)"
        )
    if model == "embedded":
        from .embedded import embedded_model_dir

        return str(embedded_model_dir())
    if not model:
        raise UserError("model: empty model string; use `embedded`, a local model directory or a hub id")
    return model
