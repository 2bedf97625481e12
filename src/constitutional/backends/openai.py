"""The `openai` backend: a model behind an OpenAI-compatible HTTP server (vLLM, llama.cpp, TGI,
SGLang, Ollama), for models too large to run in-process (docs/ARCHITECTURE.md "Model backends").

Model string `openai:URL#model`: URL is the API base as OpenAI clients take it (e.g.
`openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct`); requests go to `{URL}/chat/completions`
and `{URL}/completions` with `model` set to the name after `#`. Settings (constructor arguments,
defaults from the environment):

- CAI_OPENAI_MAX_CONCURRENCY (8): requests in flight at once; CAI_OPENAI_TIMEOUT (120): seconds per
  request; CAI_OPENAI_MAX_RETRIES (6) and CAI_OPENAI_BACKOFF (0.5): the retry policy (`openai_http.py`);
- CAI_OPENAI_API_KEY_ENV (OPENAI_API_KEY): the variable that holds the API key, sent as a bearer
  token when set; the key is never part of a message, `repr`, `name` or `stats`;
- CAI_OPENAI_TOKENIZER: a local model directory or hub id (or `embedded`) with the served model's
  chat template, for the prompts rendered here (default: the `#model` name; vLLM serves a model under
  its hub id or path); CAI_OPENAI_LOGPROBS (auto): how log-probabilities are read, see below.

Retries (`openai_http.py`): connection errors, timeouts, HTTP 5xx, 408, 429 and invalid JSON are
retried with jittered exponential backoff; any other 4xx fails at once with the server's message.

Generation: one request per (conversation, sample), run concurrently. A conversation ending with an
assistant message (a prefill) is rendered here with the chat template and continued through
`/completions`, since the chat endpoint cannot continue a message portably. Each request carries a
seed derived from (seed, conversation, sample index), so results do not depend on batching.

Log-probabilities (`option_logprobs`, `openai_score.py`): on `/completions`, by echo (exact) or by
the top-20 next-token log-probs, chosen by a probe on the first call (CAI_OPENAI_LOGPROBS=auto).
Departures: in top mode an option token missing from the top 20 scores the smallest listed
log-prob, an upper bound (counted in stats["option_not_in_top"]); seeds are best effort (servers may
ignore them or batch non-deterministically); no repetition penalty unless the server reads the
non-standard `repetition_penalty` field (vLLM does). Requests are independent, so a stage that stops
on a server failure resumes from its written records as usual.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.request
from typing import Sequence

from ..errors import UserError
from .base import Completion, Conversation, GenerationParams, as_messages, cut_at_stop, render_messages
from .openai_http import HTTPClient
from .openai_score import LogprobScoring
FORM = "use openai:URL#model with URL the API base, e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct"
STAT_KEYS = ("requests", "attempts", "retries", "failures", "http_5xx", "http_429", "http_408",
             "timeouts", "connection_errors", "invalid_json", "option_not_in_top")


def parse_openai(spec: str) -> tuple[str, str]:
    """`openai:URL#model` (the `openai:` prefix optional) -> (API base URL without a trailing /, model)."""
    rest = spec[len("openai:"):] if spec.startswith("openai:") else spec
    url, sep, model = rest.strip().partition("#")
    url, model = url.strip().rstrip("/"), model.strip()
    if not sep or not model:
        raise UserError(f"model {spec!r}: no model name after '#'; {FORM}")
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise UserError(f"model {spec!r}: the server URL must start with http:// or https://; {FORM}")
    return url, model


def _setting(value, env: str, default, kind, minimum):
    """A constructor argument, else the environment variable `env`, else `default`; checked."""
    raw = value if value is not None else os.environ.get(env, "").strip() or default
    try:
        v = kind(raw)
        if v < minimum:
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{env}={raw!r}: expected a {kind.__name__} >= {minimum}; fix or unset the variable (or the setting)") from None
    return v


class OpenAIBackend(HTTPClient, LogprobScoring):
    """A model behind an OpenAI-compatible server, behind the backend protocol (see `base.py`)."""

    def __init__(
        self,
        model: str,
        name: str | None = None,
        max_concurrency: int | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        backoff: float | None = None,
        max_backoff: float = 30.0,
        api_key_env: str | None = None,
        tokenizer: str | None = None,
        logprobs_mode: str | None = None,
        system_prompt: str | None = None,
        max_rows: int | None = None,
        **_,
    ):
        self.base_url, self.model = parse_openai(model)
        self.name = name or (model if model.startswith("openai:") else f"openai:{model}")
        self.max_concurrency = _setting(max_concurrency, "CAI_OPENAI_MAX_CONCURRENCY", 8, int, 1)
        if max_rows:  # a stage's "most sequences decoded together" also bounds the requests in flight
            self.max_concurrency = min(self.max_concurrency, max(1, int(max_rows)))
        self.timeout = _setting(timeout, "CAI_OPENAI_TIMEOUT", 120, float, 0.001)
        self.max_retries = _setting(max_retries, "CAI_OPENAI_MAX_RETRIES", 6, int, 0)
        self.backoff = _setting(backoff, "CAI_OPENAI_BACKOFF", 0.5, float, 0)
        self.max_backoff = float(max_backoff)
        self.api_key_env = api_key_env or os.environ.get("CAI_OPENAI_API_KEY_ENV", "").strip() or "OPENAI_API_KEY"
        self._key = os.environ.get(self.api_key_env, "").strip() or None
        self.tokenizer_path = tokenizer or os.environ.get("CAI_OPENAI_TOKENIZER", "").strip() or None
        self.logprobs_mode = (logprobs_mode or os.environ.get("CAI_OPENAI_LOGPROBS", "").strip() or "auto").lower()
        if self.logprobs_mode not in ("auto", "echo", "top"):
            raise UserError(f"CAI_OPENAI_LOGPROBS={self.logprobs_mode!r}: use auto, echo or top")
        # as HFBackend: None keeps the chat template's default; a string is the system message of
        # conversations that carry none
        self.system_prompt = system_prompt
        self._tokenizer = None
        self._tok_lock, self._stats_lock, self._mode_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self.stats = {k: 0 for k in STAT_KEYS}
        self._sleep, self._rng = time.sleep, random.Random()
        self._opener = urllib.request.build_opener()  # honours http(s)_proxy / no_proxy

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.name!r}, max_concurrency={self.max_concurrency}, timeout={self.timeout})"

    # ---------------------------------------------------------------- chat template
    @property
    def tokenizer(self):
        """The served model's tokenizer, loaded on first use (chat templates, top-mode scoring)."""
        if self._tokenizer is None:
            with self._tok_lock:
                if self._tokenizer is None:
                    self._tokenizer = self._load_tokenizer()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self._tokenizer = tok

    def _load_tokenizer(self):
        path = self.tokenizer_path or self.model
        try:
            if path == "embedded":
                from .embedded import embedded_model_dir

                path = str(embedded_model_dir())
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError, ImportError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"{self.name}: rendering a chat prompt locally (labeling prompts, prefills) needs the model's tokenizer "
                f"and {path!r} cannot be loaded ({first[:200]}); set CAI_OPENAI_TOKENIZER to a local model directory "
                "or hub id with the same chat template"
            ) from None

    def _messages(self, conversation: Conversation) -> list:
        messages = as_messages(conversation)
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def render_chat(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        messages = self._messages(conversation)  # as HFBackend.render_chat
        return render_messages(self.tokenizer, messages, add_generation_prompt)

    # ---------------------------------------------------------------- generation
    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        params.check()
        jobs = []
        for conv in conversations:
            messages = self._messages(conv)
            prompt = self.render_chat(messages) if messages and messages[-1]["role"] == "assistant" else None
            key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
            for j in range(params.n):
                seed = int.from_bytes(hashlib.sha256(f"{params.seed}:{j}:{key}".encode()).digest()[:8], "big") & 0x7FFFFFFF
                jobs.append((messages, prompt, seed))
        return self._map(lambda job: self._generate_one(*job, params), jobs)

    def _generate_one(self, messages: list, prompt: str | None, seed: int, params: GenerationParams) -> Completion:
        body = {"model": self.model, "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p, "seed": seed}
        if params.stop:
            body["stop"] = list(params.stop)[:4]  # the OpenAI API takes at most 4; the rest are cut here
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if prompt is None:
            path, body["messages"] = "/chat/completions", messages
        else:
            path, body["prompt"] = "/completions", prompt
        choice = self._choice(self._post(path, body), self.base_url + path)
        text = (choice.get("message") or {}).get("content") if prompt is None else choice.get("text")
        text = text or ""
        cut = cut_at_stop(text, params.stop)
        return Completion(cut.strip(), truncated=choice.get("finish_reason") == "length" and cut == text)
