"""The `openai` backend: a model behind an OpenAI-compatible HTTP server (vLLM, llama.cpp, TGI,
SGLang, Ollama), for models too large to run in-process.

Model string `openai:URL#model`: URL is the API base as OpenAI clients take it (e.g.
`openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct`); requests go to `{URL}/chat/completions`
and `{URL}/completions` with `model` set to the name after `#`. Settings (constructor arguments,
defaults from the environment):

- CAI_OPENAI_MAX_CONCURRENCY (8): requests in flight at once; CAI_OPENAI_TIMEOUT (120): seconds per
  request; CAI_OPENAI_MAX_RETRIES (6) and CAI_OPENAI_BACKOFF (0.5): the retry policy below;
- CAI_OPENAI_API_KEY_ENV (OPENAI_API_KEY): the variable that holds the API key, sent as a bearer
  token when set; the key is never part of a message, `repr`, `name` or `stats`;
- CAI_OPENAI_TOKENIZER: a local model directory or hub id (or `embedded`) with the served model's
  chat template, for the prompts rendered here (default: the `#model` name; vLLM serves a model under
  its hub id or path); CAI_OPENAI_LOGPROBS (auto): how log-probabilities are read, see below.

Retries: connection errors (refused, reset, dropped), timeouts, HTTP 5xx, 408, 429 and a 200 with
invalid JSON are retried up to max_retries times, sleeping `min(max_backoff, backoff * 2**k)` times a
factor uniform in [0.5, 1] ("equal jitter") before retry k, or a numeric Retry-After (capped by
max_backoff). Any other 4xx fails at once with the server's message. Counts are in `self.stats`.

Generation: one request per (conversation, sample), run concurrently. A conversation ending with an
assistant message (a prefill) is rendered here with the chat template and continued through
`/completions`, since the chat endpoint cannot continue a message portably. Each request carries a
seed derived from (seed, conversation, sample index), so results do not depend on batching.

Log-probabilities (`option_logprobs`), on `/completions`:
- echo: the server scores `prompt + option` (echo=true, logprobs=1) and the option's tokens are found
  by their character offsets; exact, one request per option; needs the option to start at a token
  boundary of the server's tokenizer;
- top: for servers without echo, the option is split into tokens with the local tokenizer and each
  token's log-prob is read from the top-20 next-token log-probs, one request per option token;
- auto (default): on the first call, a probe compares the echo log-prob of the greedy next token after
  a short text with its next-token log-prob; echo is used only if the server echoes, the two agree
  and the first option's offsets line up, else top for good. (llama-cpp-python 0.3's echo is shifted
  by one token, its issue #1983, its offsets skip special tokens, and it is slow on long prompts.)
Departures: in top mode an option token missing from the top 20 scores the smallest listed
log-prob, an upper bound (counted in stats["option_not_in_top"]); seeds are best effort (servers may
ignore them or batch non-deterministically); no repetition penalty unless the server reads the
non-standard `repetition_penalty` field (vLLM does). Requests are independent, so a stage that stops
on a server failure resumes from its written records as usual.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..errors import UserError
from .base import Completion, Conversation, GenerationParams, as_messages, cut_at_stop, render_messages

log = logging.getLogger(__name__)
FORM = "use openai:URL#model with URL the API base, e.g. openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct"
TOP_K = 20
PROBE = "The capital of France is"  # the echo check's prompt (auto mode)
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


class _EchoOffsets(UserError):
    """The echoed tokens' character offsets do not line up with the option's start."""


class _ClientError(UserError):
    """A 4xx the request cannot recover from (kept apart so echo probing can fall back)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class _NoLogprobs(Exception):
    """The server answered, but without the log-probabilities a scoring method needs."""


class OpenAIBackend:
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

    # ---------------------------------------------------------------- HTTP
    def _count(self, key: str, k: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + k

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, path: str, body: dict) -> dict:
        """POST JSON to `{base}{path}` with retries; the decoded JSON response."""
        url = self.base_url + path
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        self._count("requests")
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._count("attempts")
            wait = None
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with self._opener.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    out = json.loads(raw)
                    if not isinstance(out, dict):
                        raise ValueError
                    return out
                except ValueError:
                    kind, last = "invalid_json", "invalid JSON in a 200 response"
            except urllib.error.HTTPError as e:
                msg = self._server_message(e)
                if not (e.code >= 500 or e.code in (408, 429)):
                    raise _ClientError(self._client_error(url, e.code, msg), e.code) from None
                kind, last = ("http_5xx" if e.code >= 500 else f"http_{e.code}"), f"HTTP {e.code} ({msg})"
                try:
                    wait = min(self.max_backoff, max(0.0, float(e.headers.get("Retry-After", ""))))
                except (TypeError, ValueError, AttributeError):
                    wait = None
            except urllib.error.URLError as e:  # connect failed: the reason is the socket error
                timeout = isinstance(e.reason, TimeoutError)
                kind, last = ("timeouts" if timeout else "connection_errors"), self._redact(f"cannot connect ({e.reason})")
            except TimeoutError:
                kind, last = "timeouts", f"no response within {self.timeout:g} s (CAI_OPENAI_TIMEOUT)"
            except (http.client.HTTPException, OSError) as e:  # reset, RemoteDisconnected, IncompleteRead
                kind, last = "connection_errors", self._redact(f"connection dropped ({type(e).__name__}: {e})"[:240])
            self._count(kind)
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = min(self.max_backoff, self.backoff * 2**attempt) * self._rng.uniform(0.5, 1.0)
            self._count("retries")
            log.warning("openai server %s: %s; retry %d/%d in %.1f s", self.base_url, last, attempt + 1, self.max_retries, wait)
            self._sleep(wait)
        self._count("failures")
        raise UserError(
            f"openai server {self.base_url}: {last} after {self.max_retries + 1} attempts; "
            "check that the server is up (a rerun resumes where this stopped)"
        )

    def _server_message(self, e: urllib.error.HTTPError) -> str:
        try:
            raw = e.read().decode("utf-8", "replace")
        except Exception:  # the body is only for the message
            raw = ""
        msg = raw
        try:
            body = json.loads(raw)
            err = body.get("error", body) if isinstance(body, dict) else body
            msg = (err.get("message") or err.get("detail") or json.dumps(err)) if isinstance(err, dict) else str(err)
        except ValueError:
            pass
        msg = " ".join(self._redact(str(msg)).split()) or (e.reason or "no message")
        return msg[:200] + ("..." if len(msg) > 200 else "")

    def _client_error(self, url: str, status: int, msg: str) -> str:
        head = f"openai server {url}: HTTP {status} ({msg}); "
        if status in (401, 403):
            return head + f"check the API key in the environment variable {self.api_key_env} (CAI_OPENAI_API_KEY_ENV names another)"
        if status == 404:
            return head + f"the endpoint or model name was not found on the server; check the API base URL (usually ending in /v1) and the model {self.model!r}"
        return head + "the server rejected the request; check the model name and the server's limits"

    def _map(self, fn, items: list) -> list:
        """fn over items, at most max_concurrency at a time, results in order."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="cai-openai")
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a failure cancels what has not started

    @staticmethod
    def _choice(resp: dict, url: str) -> dict:
        choices = resp.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            err = resp.get("error")
            raise UserError(f"openai server {url}: a response without choices ({str(err or resp)[:200]}); is this an OpenAI-compatible API base?")
        return choices[0]

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

    # ---------------------------------------------------------------- scoring
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """log p(option | prompt) in nats summed over the option's tokens, for every option of every prompt."""
        if len(prompts) != len(options):
            raise ValueError("prompts and options differ in length")
        pairs = []
        for i, (prompt, opts) in enumerate(zip(prompts, options)):
            if not opts:
                raise UserError(f"prompt {i}: no options to score")
            for j, option in enumerate(opts):
                if not option:
                    raise UserError(f"prompt {i} option {j}: empty option string; options must contain text")
                pairs.append((prompt, option, f"prompt {i} option {j}"))
        scores: dict[int, float] = {}
        if pairs and self.logprobs_mode == "auto":
            with self._mode_lock:  # the first call finds out whether the server echoes log-probs, and right
                if self.logprobs_mode == "auto":
                    try:  # a short probe first: some servers' echo is slow on long prompts as well as wrong
                        agrees = self._echo_agrees(PROBE)
                        if agrees:
                            scores[0] = self._echo_score(*pairs[0])
                        self.logprobs_mode = "echo" if agrees else "top"
                    except _NoLogprobs:
                        self.logprobs_mode = "top"
                    except _EchoOffsets:  # e.g. llama-cpp-python counts offsets without the special tokens
                        log.warning("openai server %s: its echo offsets do not match the prompt text; using top log-probs", self.base_url)
                        self.logprobs_mode = "top"
                    except _ClientError as e:
                        if e.status in (401, 403, 404):
                            raise
                        self.logprobs_mode = "top"
                    log.info("openai server %s: option log-probs by %s", self.base_url, self.logprobs_mode)
        rest = [k for k in range(len(pairs)) if k not in scores]
        if self.logprobs_mode == "echo":
            scores.update(zip(rest, self._map(lambda k: self._checked(self._echo_score, *pairs[k]), rest)))
        else:
            scores.update(zip(rest, self._top_scores([pairs[k] for k in rest])))
        out, k = [], 0
        for opts in options:
            out.append([scores[k + j] for j in range(len(opts))])
            k += len(opts)
        return out

    def sequence_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log p(continuation | prompt) in nats, one per pair."""
        return [s[0] for s in self.option_logprobs(prompts, [[c] for c in continuations])]

    def _checked(self, score, prompt: str, option: str, where: str) -> float:
        try:
            return score(prompt, option, where)
        except _NoLogprobs as e:
            raise self._no_logprobs(f"{e}; needs echo with logprobs, or top logprobs") from None

    def _no_logprobs(self, detail: str) -> UserError:
        """The one-line error for a server without the log-probabilities that scoring needs."""
        return UserError(
            f"openai server {self.base_url} returns no log-probabilities on /completions ({detail}); use a server "
            "that returns them (vLLM, llama.cpp) or a local model for labeling"
        )

    def _echo_agrees(self, prompt: str) -> bool:
        """Whether the server's echo log-probs are the next-token ones: the greedy next token after
        `prompt` must get the same log-prob from both. (llama-cpp-python 0.3 scores each echoed token
        with the distribution that follows it, a shift by one token: its issue #1983.)"""
        body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": TOP_K}
        choice = self._choice(self._post("/completions", body), self.base_url + "/completions")
        top, token = _top_logprobs(choice), choice.get("text")
        if not top or not token or token not in top:
            return True  # nothing to compare with: trust echo (the first option's echo shows whether it works)
        try:
            echoed = self._echo_score(prompt, token, "the echo check")
        except (UserError, _NoLogprobs):  # e.g. the token does not start at a boundary when re-tokenized
            return True
        if abs(echoed - top[token]) <= 0.05 + 0.01 * abs(top[token]):
            return True
        log.warning(
            "openai server %s: its echo log-probs disagree with its next-token log-probs (%.3f vs %.3f nats for %r), "
            "so they are not used; options are scored from the top-%d next-token log-probs instead",
            self.base_url, echoed, top[token], token, TOP_K,
        )
        self._count("echo_disagrees")
        return False

    def _echo_score(self, prompt: str, option: str, where: str) -> float:
        """The server scores prompt+option (echo); sum over the tokens at the option's character offsets."""
        text = prompt + option
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
        choice = self._choice(self._post("/completions", body), self.base_url + "/completions")
        lp = choice.get("logprobs") or {}
        tokens, values, offsets = lp.get("tokens"), lp.get("token_logprobs"), lp.get("text_offset")
        if not (isinstance(values, list) and isinstance(offsets, list) and values and len(values) == len(offsets)):
            raise _NoLogprobs("no echo logprobs (token_logprobs with text_offset)")
        # A server that renders a BOS token ("<s>") in front shifts every offset by its length.
        shift, echoed = 0, choice.get("text")
        if isinstance(tokens, list) and isinstance(echoed, str) and echoed.startswith(text):
            joined = "".join(str(t) for t in tokens)
            if joined.endswith(echoed):
                shift = len(joined) - len(echoed)
        start, end = len(prompt) + shift, len(text) + shift
        if start not in offsets:
            raise _EchoOffsets(
                f"{where}: option {option!r} does not start at a token boundary for the tokenizer of {self.name}; "
                "begin the options with a space or use a different option form"
            )
        picked = [v for o, v in zip(offsets, values) if start <= o < end]
        if not picked or any(v is None for v in picked):
            raise _NoLogprobs("no echo logprobs for the option's tokens")
        return float(sum(picked))

    def _top_plan(self, prompt: str, option: str, where: str) -> list[tuple[str, tuple[str, ...]]]:
        """The option split into tokens with the local tokenizer: per token, (the text after which it
        comes, the strings it may appear as among the server's top log-probs)."""
        tok = self.tokenizer
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        full = tok(prompt + option, add_special_tokens=False)["input_ids"]
        if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
            ids, anchor = full[len(p_ids):], p_ids[-1:]
        else:  # the tokenizer merged across the boundary: score the option's own tokens
            ids, anchor = tok(option, add_special_tokens=False)["input_ids"], []
        if not ids:
            raise UserError(f"{where}: option {option!r} has no tokens for the tokenizer of {self.name}; use options with visible text")
        # The text each token adds, decoded after one prompt token so a leading space is kept.
        pieces, prev = [], tok.decode(anchor) if anchor else ""
        for k in range(len(ids)):
            cur = tok.decode(anchor + ids[: k + 1])
            pieces.append(cur[len(prev):])
            prev = cur
        return [(prompt + "".join(pieces[:k]), (pieces[k], tok.decode([t]))) for k, t in enumerate(ids)]

    def _top_scores(self, pairs: list[tuple[str, str, str]]) -> list[float]:
        """Each option token's log-prob read from the top-K next-token log-probs (upper bound if absent).
        Options that share a beginning (" (A)", " (B)") share its requests: each distinct text is sent once."""
        plans = [self._top_plan(*pair) for pair in pairs]
        texts = sorted({text for plan in plans for text, _ in plan})

        def fetch(text: str) -> dict[str, float]:
            body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": TOP_K}
            top = _top_logprobs(self._choice(self._post("/completions", body), self.base_url + "/completions"))
            if not top:
                raise self._no_logprobs("no echo logprobs and no top logprobs")
            return top

        tops = dict(zip(texts, self._map(fetch, texts)))
        out = []
        for plan in plans:
            total = 0.0
            for text, keys in plan:
                top = tops[text]
                hit = next((top[key] for key in keys if key in top), None)
                if hit is None:
                    hit = min(top.values())
                    self._count("option_not_in_top")
                total += hit
            out.append(total)
        return out


def _top_logprobs(choice: dict) -> dict[str, float] | None:
    """The next token's top log-probs as {token text: logprob}: the completions format
    (`top_logprobs: [{tok: lp}]`) or the chat-style one llama.cpp uses (`content: [{top_logprobs: [...]}]`)."""
    lp = choice.get("logprobs") or {}
    top = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if isinstance(top, list) and top and isinstance(top[0], dict) and top[0]:
        return {str(k): float(v) for k, v in top[0].items() if v is not None}
    content = lp.get("content") if isinstance(lp, dict) else None
    if isinstance(content, list) and content and isinstance(content[0], dict):
        entries = content[0].get("top_logprobs") or []
        return {str(e["token"]): float(e["logprob"]) for e in entries if isinstance(e, dict) and e.get("logprob") is not None} or None
    return None
