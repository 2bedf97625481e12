"""The backend protocol (docs/ARCHITECTURE.md "Model backends", a contract) and the helpers every
backend shares: requests and their queue, chat rendering, stop strings.

Every stage that runs a model at inference time talks to it through three calls:

- `generate(conversations, params) -> list[str]`: chat generation; returns `len(conversations) * n`
  strings, grouped by conversation (`out[i * n + j]` is sample j of conversation i). Backends return
  `Completion` strings, which also say whether the text was cut by `max_new_tokens`
  (`.truncated`). A conversation that ends with an assistant message is continued from that
  message's text (a prefill), e.g. to sample reasoning after "Let's think step-by-step:".
- `option_logprobs(prompts, options) -> list[list[float]]`: total log-probability (nats) of each
  option string as a continuation of each raw-text prompt; options may be several tokens long.
- `sequence_logprobs(prompts, continuations) -> list[float]`: log p(continuation | prompt), nats.

Model strings (`embedded`, a directory or hub id, `openai:URL#model`, `prompted:...`) are resolved
to backends by `registry.py`; this module imports no backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence, Union, runtime_checkable

from ..errors import UserError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = Union[str, Sequence[Message]]  # a bare string is one user message


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    n: int = 1  # samples per conversation
    seed: int = 0
    stop: list[str] = field(default_factory=list)  # cut the text at the first of these strings
    # > 1 discourages repeating tokens already generated in this sample (CTRL-style: a positive
    # logit is divided by it, a negative one multiplied); the prompt is not penalised, so few-shot
    # text stays usable. Small models at low temperature loop without it.
    repetition_penalty: float = 1.0

    def check(self) -> None:
        """One-line `UserError` for settings no backend can use."""
        if self.n < 1 or self.max_new_tokens < 1:
            raise UserError(f"generation: n and max_new_tokens must be >= 1 (got n={self.n}, max_new_tokens={self.max_new_tokens})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise UserError(
                f"generation: temperature must be >= 0, top_p in (0, 1] and repetition_penalty > 0 "
                f"(got {self.temperature}, {self.top_p}, {self.repetition_penalty})"
            )


class Completion(str):
    """Generated text; `truncated` is True when generation stopped at `max_new_tokens` (or the
    context end) rather than at an end-of-turn token or a stop string."""

    truncated: bool = False

    def __new__(cls, text: str, truncated: bool = False):
        obj = super().__new__(cls, text)
        obj.truncated = truncated
        return obj


@dataclass(eq=False)
class Request:
    """One generation request for `run_queue`: a conversation, its settings (`params.n` samples), and
    the caller's handle (`key`, untouched)."""

    conversation: Conversation
    params: GenerationParams
    key: Any = None


OnDone = Callable[[Request, list], Union[Iterable[Request], None]]


def run_queue(backend, requests: Iterable[Request], on_done: OnDone) -> None:
    """Generate every request; `on_done(request, completions)` (a list of `params.n` `Completion`s)
    is called as each request finishes, and the requests it returns are generated too (a retry, a
    chain's next step). Backends with a scheduler of their own (`schedule`: the `hf` backend's
    continuous batching) run it; others go in waves (`run_waves`)."""
    schedule = getattr(backend, "schedule", None)
    if schedule is not None:
        return schedule(requests, on_done)
    return run_waves(backend, requests, on_done)


def run_waves(backend, requests: Iterable[Request], on_done: OnDone) -> None:
    """`run_queue` for a backend without a scheduler: each wave is every waiting request, one
    `generate` call per distinct settings; the requests `on_done` returns form the next wave."""
    wave = list(requests)
    while wave:
        groups: dict[tuple, list[Request]] = {}
        for r in wave:
            groups.setdefault(_params_key(r.params), []).append(r)
        wave = []
        for reqs in groups.values():
            params, n = reqs[0].params, reqs[0].params.n
            texts = backend.generate([r.conversation for r in reqs], params)
            for i, r in enumerate(reqs):
                wave += list(on_done(r, texts[i * n : (i + 1) * n]) or [])


def run_queues(work: Iterable[tuple], on_done: Callable) -> None:
    """`run_queue` for requests bound to several backends (e.g. a separate critique model): `work` and
    what `on_done(request, completions)` returns are (backend, Request) pairs. The requests of the
    backend that is running join its queue; the others wait until that queue is empty."""
    pending: dict[int, tuple] = {}

    def add(items) -> None:
        for backend, req in items:
            pending.setdefault(id(backend), (backend, []))[1].append(req)

    add(work)
    while pending:
        backend, reqs = pending.pop(next(iter(pending)))

        def done(req, texts, backend=backend):
            more = list(on_done(req, texts) or [])
            add([(b, r) for b, r in more if b is not backend])
            return [r for b, r in more if b is backend]

        run_queue(backend, reqs, done)


def generation_meter(*backends) -> Callable[[], dict]:
    """Starts a clock on the backends' generation counters; the returned function gives what they
    generated since: tokens, seconds, tokens/s, and the mean rows per decode step and the prompt
    tokens prefilled (hf backend)."""
    import time

    def stats_of(b) -> dict:
        return dict(getattr(b, "stats", None) or getattr(getattr(b, "backend", None), "stats", None) or {})

    uniq = list({id(b): b for b in backends}.values())
    start, t0 = [stats_of(b) for b in uniq], time.perf_counter()

    def read() -> dict:
        delta = {k: 0 for k in ("generated_tokens", "decode_steps", "decode_rows", "prefill_tokens")}
        for b, s0 in zip(uniq, start):
            now = stats_of(b)
            for k in delta:
                delta[k] += now.get(k, 0) - s0.get(k, 0)
        seconds = time.perf_counter() - t0
        return {
            "generated_tokens": delta["generated_tokens"],
            "generation_seconds": round(seconds, 1),
            "tokens_per_s": round(delta["generated_tokens"] / seconds, 1) if delta["generated_tokens"] and seconds else None,
            "mean_batch_rows": round(delta["decode_rows"] / delta["decode_steps"], 1) if delta["decode_steps"] else None,
            # prompt tokens run through the model (shared prefixes and kept prompts not counted again)
            "prefill_tokens": delta["prefill_tokens"] if delta["decode_steps"] else None,
        }

    return read


def _params_key(p: GenerationParams) -> tuple:
    return (p.max_new_tokens, p.temperature, p.top_p, p.n, p.seed, tuple(p.stop), p.repetition_penalty)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of the stop strings (all of it when none occurs)."""
    cut = len(text)
    for s in stops or ():
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[str]: ...

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]: ...

    def sequence_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]: ...

    def render_chat(self, conversation: Conversation, add_generation_prompt: bool = True) -> str: ...


def as_messages(conversation: Conversation) -> list[Message]:
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    return [dict(m) for m in conversation]


def render_messages(tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    """A conversation as prompt text with the tokenizer's chat template. A conversation that ends with
    an assistant message is continued from that message's text (a prefill); a tokenizer without a
    chat template (a base model) gets the paper's `Human:`/`Assistant:` transcript form."""
    prefill = add_generation_prompt and bool(messages) and messages[-1]["role"] == "assistant"
    if getattr(tokenizer, "chat_template", None):
        if prefill:
            return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    from ..data.loaders import to_transcript

    return "\n\n" + to_transcript(messages) + ("\n\nAssistant:" if add_generation_prompt and not prefill else "")
