"""Log-probabilities for the `openai` backend (`option_logprobs`, `sequence_logprobs`), on `/completions`:

- echo: the server scores `prompt + option` (echo=true, logprobs=1) and the option's tokens are found
  by their character offsets; exact, one request per option; needs the option to start at a token
  boundary of the server's tokenizer;
- top: for servers without echo, the option is split into tokens with the local tokenizer and each
  token's log-prob is read from the top-20 next-token log-probs, one request per option token;
- auto (default): on the first call, a probe compares the echo log-prob of the greedy next token after
  a short text with its next-token log-prob; echo is used only if the server echoes, the two agree
  and the first option's offsets line up, else top for good. (llama-cpp-python 0.3's echo is shifted
  by one token, its issue #1983, its offsets skip special tokens, and it is slow on long prompts.)
Departure: in top mode an option token missing from the top 20 scores the smallest listed
log-prob, an upper bound (counted in stats["option_not_in_top"]).
"""

from __future__ import annotations

import logging
from typing import Sequence

from ..errors import UserError
from .openai_http import ClientError

log = logging.getLogger("constitutional.backends.openai")
TOP_K = 20
PROBE = "The capital of France is"  # the echo check's prompt (auto mode)


class _EchoOffsets(UserError):
    """The echoed tokens' character offsets do not line up with the option's start."""


class _NoLogprobs(Exception):
    """The server answered, but without the log-probabilities a scoring method needs."""


class LogprobScoring:
    """`OpenAIBackend`'s scoring calls (see the module docstring)."""

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
                    except ClientError as e:
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
        top, token = top_logprobs(choice), choice.get("text")
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
            top = top_logprobs(self._choice(self._post("/completions", body), self.base_url + "/completions"))
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


def top_logprobs(choice: dict) -> dict[str, float] | None:
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
