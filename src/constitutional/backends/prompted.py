"""The prompted model (`prompted:<model>`, `prompted:<context file>#<model>`): any backend with a
dialogue-prompting context C in front of every request. The context itself (loading, its text and
chat forms, where C goes) is `constitutional/context.py`; docs/ARCHITECTURE.md "Model backends".
"""

from __future__ import annotations

from typing import Sequence

from ..context import BUILTIN, Context
from ..errors import UserError
from .base import Conversation, GenerationParams, Message, Request, run_queue

_PROBE = "[constitutional: is the system message kept?]"


class PromptedBackend:
    """The prompted model: any backend with the context C in front of every request (the backend
    protocol of `base.py`; placement in `context.py`'s docstring)."""

    def __init__(self, backend, context: Context, name: str | None = None):
        if isinstance(backend, PromptedBackend):
            raise UserError("a prompted model cannot be prompted again; give one context")
        self.backend = backend
        self.context = context
        self.name = name or f"prompted:{backend.name}"
        probe = backend.render_chat([{"role": "system", "content": _PROBE}, {"role": "user", "content": "x"}])
        self.system_kept = _PROBE in probe

    @property
    def dtype(self):
        return getattr(self.backend, "dtype", None)

    def messages(self, conversation: Conversation) -> list[Message]:
        """The chat messages the wrapped backend receives for `conversation`."""
        return self.context.apply(conversation, self.system_kept)

    def prompt(self, prompt: str) -> str:
        """The raw text the wrapped backend receives for a raw-text `prompt`."""
        return self.context.text() + prompt

    def render_chat(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        return self.backend.render_chat(self.messages(conversation), add_generation_prompt)

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]:
        return self.backend.generate([self.messages(c) for c in conversations], params)

    def schedule(self, requests, on_done) -> None:
        """`base.run_queue` through the wrapped backend, each conversation with C in front."""

        def inner_done(req, completions):
            more = on_done(req.key, completions)
            return [wrap(r) for r in more] if more else None

        def wrap(r):
            return Request(self.messages(r.conversation), r.params, key=r)

        run_queue(self.backend, [wrap(r) for r in requests], inner_done)

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        return self.backend.option_logprobs([self.prompt(p) for p in prompts], options)

    def sequence_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        return self.backend.sequence_logprobs([self.prompt(p) for p in prompts], continuations)


def parse_prompted(model: str) -> tuple[str, str]:
    """`prompted:<model>` -> ("builtin", model); `prompted:<context file>#<model>` -> (file, model).
    A model string that itself contains '#' (openai:URL#model) needs the context part."""
    rest = model[len("prompted:"):].strip()
    context, sep, inner = rest.partition("#")
    if not sep or rest.startswith("openai:"):
        context, inner = BUILTIN, rest
    context, inner = context.strip(), inner.strip()
    if not inner or not context:
        raise UserError(f"model {model!r}: expected prompted:<model> or prompted:<context file>#<model>, e.g. prompted:embedded")
    if inner.startswith("prompted:"):
        raise UserError(f"model {model!r}: a prompted model cannot be prompted again; give one context")
    return context, inner
