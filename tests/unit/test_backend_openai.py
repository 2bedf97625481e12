"""The openai backend against a fake OpenAI-compatible server on 127.0.0.1 (no model, no network).

The fake's "model" is a toy where every character is a token with log-prob -(ord(c) % 7 + 1) / 10,
whatever the context, so option scores have a brute-force reference; each test scripts the faults of
the next requests and reads back the request bodies, headers and the peak number of requests in flight.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import string
import sys
import threading
import time
import types
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from constitutional.backends import GenerationParams, load_backend
from constitutional.backends.openai import OpenAIBackend, parse_openai
from constitutional.errors import UserError

KEY = "sk-test-SECRET123"
GEN = "b"  # the toy's most likely next character
VOCAB = " " + string.ascii_lowercase


def lp(text: str) -> float:
    return sum(-((ord(c) % 7) + 1) / 10 for c in text)


def top(k: int) -> dict[str, float]:
    return {c: lp(c) for c in sorted(VOCAB, key=lambda c: (-lp(c), c))[:k]}


class Fake:
    def __init__(self):
        self.faults: deque = deque()  # one entry per coming request: ("status", code, headers, body) | ("sleep", s) | ("close",) | ("badjson",)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.active = self.max_active = 0
        self.delay = 0.0
        self.echo_ok, self.logprobs_ok, self.bos, self.merge, self.top_format = True, True, "", None, "completions"
        self.echo_shift = False  # echo scores each token with the wrong distribution, as llama-cpp-python 0.3 does

    def tokens(self, text: str) -> list[str]:
        out, i = [], 0
        while i < len(text):
            n = 2 if self.merge and text.startswith(self.merge, i) else 1
            out.append(text[i : i + n])
            i += n
        return out

    def generation(self, text: str, body: dict, chat: bool) -> dict:
        finish = "stop"
        for s in body.get("stop") or []:
            text = text.split(s)[0]
        if len(text) > body["max_tokens"]:
            text, finish = text[: body["max_tokens"]], "length"
        return {"index": 0, "finish_reason": finish, **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}

    def respond(self, path: str, body: dict) -> tuple[int, dict]:
        if path == "/v1/chat/completions":
            last = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
            return 200, {"choices": [self.generation(f"echo: {last} seed={body.get('seed')}", body, chat=True)]}
        if path != "/v1/completions":
            return 404, {"error": {"message": f"no route {path}"}}
        prompt = body["prompt"]
        if body.get("echo"):
            if not self.echo_ok:
                return 400, {"error": {"message": "echo is not supported", "type": "BadRequestError"}}
            toks = ([self.bos] if self.bos else []) + self.tokens(prompt) + [GEN]
            offsets = [sum(len(t) for t in toks[:k]) for k in range(len(toks))]
            values = [lp(toks[k - 1]) if self.echo_shift else lp(toks[k]) for k in range(1, len(toks))]
            logprobs = {"tokens": toks, "token_logprobs": [None] + values, "text_offset": offsets, "top_logprobs": None}
            return 200, {"choices": [{"text": prompt + GEN, "finish_reason": "length", "logprobs": logprobs if self.logprobs_ok else None}]}
        if body.get("logprobs"):
            best = top(body["logprobs"])
            if not self.logprobs_ok:
                logprobs = None
            elif self.top_format == "content":  # llama.cpp's chat-style layout
                logprobs = {"content": [{"token": GEN, "logprob": lp(GEN), "top_logprobs": [{"token": t, "logprob": v} for t, v in best.items()]}]}
            else:
                logprobs = {"tokens": [GEN], "token_logprobs": [lp(GEN)], "top_logprobs": [best], "text_offset": [len(prompt)]}
            return 200, {"choices": [{"text": GEN, "finish_reason": "length", "logprobs": logprobs}]}
        return 200, {"choices": [self.generation(f"continued seed={body.get('seed')}", body, chat=False)]}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        fake: Fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
            fake.active += 1
            fake.max_active = max(fake.max_active, fake.active)
            fault = fake.faults.popleft() if fake.faults else None
        try:
            time.sleep(fake.delay)
            if fault and fault[0] == "close":
                self.close_connection = True
                return
            if fault and fault[0] == "sleep":
                time.sleep(fault[1])
            if fault and fault[0] == "status":
                status, headers, payload = fault[1], fault[2], json.dumps(fault[3]).encode()
            elif fault and fault[0] == "badjson":
                status, headers, payload = 200, {}, b'{"choices": [tru'
            else:
                status, obj = fake.respond(self.path, body)
                headers, payload = {}, json.dumps(obj).encode()
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)
        finally:
            with fake.lock:
                fake.active -= 1


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("CAI_OPENAI_MAX_CONCURRENCY", "CAI_OPENAI_TIMEOUT", "CAI_OPENAI_MAX_RETRIES", "CAI_OPENAI_BACKOFF",
                "CAI_OPENAI_API_KEY_ENV", "CAI_OPENAI_TOKENIZER", "CAI_OPENAI_LOGPROBS", "OPENAI_API_KEY",
                "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.fake = Fake()
    server.fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield server.fake
    server.shutdown()
    server.server_close()


class CharTok:
    """A char-level stand-in for a transformers tokenizer (ids are code points)."""

    chat_template = "toy"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, continue_final_message=False):
        last = len(messages) - 1
        text = "".join(f"<{m['role']}>{m['content']}" + ("" if continue_final_message and k == last else "</>") for k, m in enumerate(messages))
        return text + ("<assistant>" if add_generation_prompt else "")


def make(fake: Fake, **kw) -> OpenAIBackend:
    b = OpenAIBackend(f"openai:{fake.url}#toy", **kw)
    b.slept = []
    b._sleep, b._rng = b.slept.append, random.Random(0)
    return b


# ---------------------------------------------------------------- model string and settings
@pytest.mark.parametrize("spec, expected", [
    ("openai:http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct", ("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-7B-Instruct")),
    ("openai:https://example.org/v1/#m", ("https://example.org/v1", "m")),
])
def test_parse_openai(spec, expected):
    assert parse_openai(spec) == expected


@pytest.mark.parametrize("spec", ["openai:http://127.0.0.1:8000/v1", "openai:http://127.0.0.1:8000/v1#", "openai:127.0.0.1:8000/v1#m", "openai:#m", "openai:nourl"])
def test_parse_openai_errors(spec):
    with pytest.raises(UserError, match="openai:URL#model"):
        parse_openai(spec)


def test_load_backend_dispatches_to_openai(fake):
    b = load_backend(f"openai:{fake.url}#toy", dtype="auto", batch_size=4)
    assert isinstance(b, OpenAIBackend) and b.name == f"openai:{fake.url}#toy" and b.model == "toy"
    with pytest.raises(UserError, match="openai:URL#model"):
        load_backend("openai:nourl")


def test_settings_from_environment(fake, monkeypatch):
    monkeypatch.setenv("CAI_OPENAI_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("CAI_OPENAI_TIMEOUT", "7.5")
    monkeypatch.setenv("CAI_OPENAI_TOKENIZER", "embedded")
    b = make(fake)
    assert (b.max_concurrency, b.timeout, b.max_retries, b.backoff, b.tokenizer_path) == (3, 7.5, 6, 0.5, "embedded")
    assert make(fake, max_concurrency=5).max_concurrency == 5
    monkeypatch.setenv("CAI_OPENAI_MAX_RETRIES", "many")
    with pytest.raises(UserError, match="CAI_OPENAI_MAX_RETRIES"):
        make(fake)
    monkeypatch.delenv("CAI_OPENAI_MAX_RETRIES")
    monkeypatch.setenv("CAI_OPENAI_MAX_CONCURRENCY", "0")
    with pytest.raises(UserError, match="CAI_OPENAI_MAX_CONCURRENCY"):
        make(fake)


# ---------------------------------------------------------------- generation
def test_generate_request_bodies_order_and_seeds(fake):
    b = make(fake)
    convs = ["How do I bake bread?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]
    params = GenerationParams(max_new_tokens=100, temperature=0.7, top_p=0.9, n=2, seed=3, stop=["\n\nHuman:"])
    out = b.generate(convs, params)
    assert len(out) == 4 and len(fake.requests) == 4
    bodies = {r["body"]["seed"]: r["body"] for r in fake.requests}
    assert len(bodies) == 4  # n samples -> distinct seeds
    for k, text in enumerate(out):
        assert text.startswith("echo: " + ("How do I bake bread?" if k < 2 else "hi") + " seed=")
        body = bodies[int(text.rsplit("=", 1)[1])]
        assert body["messages"] == ([{"role": "user", "content": convs[0]}] if k < 2 else convs[1])
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["stop"]) == ("toy", 100, 0.7, 0.9, ["\n\nHuman:"])
        assert "repetition_penalty" not in body and not text.truncated
        assert all(r["path"] == "/v1/chat/completions" for r in fake.requests)
    # seeds depend on (seed, conversation, sample), not on the batch
    assert b.generate(list(reversed(convs)), params) == out[2:] + out[:2]
    assert b.generate(convs, GenerationParams(max_new_tokens=100, n=2, seed=4)) != out


def test_generate_truncated_flag_stop_cut_and_penalty(fake):
    b = make(fake)
    short = b.generate(["hello there"], GenerationParams(max_new_tokens=5, repetition_penalty=1.2))
    assert short == ["echo:"] and short[0].truncated
    assert fake.requests[-1]["body"]["repetition_penalty"] == 1.2
    stops = ["#1", "#2", "#3", "#4", "there"]  # only 4 go to the server; the 5th is cut here
    cut = b.generate(["hello there"], GenerationParams(max_new_tokens=8, stop=stops))
    assert fake.requests[-1]["body"]["stop"] == stops[:4]
    assert cut == ["echo: he"] and cut[0].truncated  # the server stopped at max_tokens before "there"
    cut = b.generate(["hello there"], GenerationParams(max_new_tokens=100, stop=stops))
    assert cut == ["echo: hello"] and not cut[0].truncated


@pytest.mark.parametrize("params", [GenerationParams(n=0), GenerationParams(max_new_tokens=0), GenerationParams(temperature=-1), GenerationParams(top_p=0)])
def test_generate_rejects_bad_params(fake, params):
    with pytest.raises(UserError, match="generation:"):
        make(fake).generate(["hi"], params)
    assert fake.requests == []


def test_prefill_goes_to_completions_with_rendered_prompt(fake):
    b = make(fake)
    b.tokenizer = CharTok()
    conv = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Let's think step-by-step:"}]
    out = b.generate([conv, "plain"], GenerationParams(max_new_tokens=50, seed=1))
    by_path = {r["path"]: r["body"] for r in fake.requests}
    body = by_path["/v1/completions"]
    assert body["prompt"] == "<user>Why?</><assistant>Let's think step-by-step:" and "messages" not in body
    assert (body["model"], body["max_tokens"], body["top_p"]) == ("toy", 50, 1.0)
    assert out[0] == f"continued seed={body['seed']}" and out[1].startswith("echo: plain")


def test_render_chat_like_hf(fake):
    b = make(fake)
    b.tokenizer = tok = CharTok()
    assert b.render_chat("hi") == "<user>hi</><assistant>"
    assert b.render_chat("hi", add_generation_prompt=False) == "<user>hi</>"
    assert b.render_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]) == "<user>hi</><assistant>A"
    tok.chat_template = None  # a base model: the transcript form
    assert b.render_chat("hi") == "\n\nHuman: hi\n\nAssistant:"


def test_tokenizer_loads_once_or_says_what_to_set(fake, monkeypatch):
    calls = []

    def from_pretrained(path, **kw):
        calls.append(path)
        time.sleep(0.02)
        if path == "missing":
            raise OSError("missing is not a local folder and is not a valid model identifier\nmore")
        return CharTok()

    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(AutoTokenizer=types.SimpleNamespace(from_pretrained=from_pretrained)))
    b = make(fake)
    threads = [threading.Thread(target=b.render_chat, args=("hi",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["toy"] and isinstance(b.tokenizer, CharTok)
    with pytest.raises(UserError, match="needs the model's tokenizer .* set CAI_OPENAI_TOKENIZER"):
        make(fake, tokenizer="missing").render_chat("hi")


# ---------------------------------------------------------------- retries
@pytest.mark.parametrize("fault, kind", [
    (("status", 503, {}, {"error": {"message": "overloaded"}}), "http_5xx"),
    (("status", 500, {}, {"error": "boom"}), "http_5xx"),
    (("close",), "connection_errors"),
    (("badjson",), "invalid_json"),
    (("sleep", 0.6), "timeouts"),
])
def test_retries_then_succeeds(fake, fault, kind):
    b = make(fake, timeout=0.3)
    fake.faults.append(fault)
    assert b.generate(["hi"], GenerationParams(max_new_tokens=100))[0].startswith("echo: hi")
    assert (b.stats["requests"], b.stats["attempts"], b.stats["retries"], b.stats[kind]) == (1, 2, 1, 1)
    assert len(b.slept) == 1 and 0.25 <= b.slept[0] <= 0.5


def test_backoff_doubles_with_equal_jitter_and_is_capped(fake):
    b = make(fake, backoff=1.0, max_backoff=5.0, max_retries=6)
    fake.faults.extend([("status", 502, {}, {})] * 5)
    b.generate(["hi"], GenerationParams())
    assert b.stats["attempts"] == 6 and b.stats["http_5xx"] == 5
    for k, slept in enumerate(b.slept):
        base = min(5.0, 2.0**k)
        assert 0.5 * base <= slept <= base
    assert b.slept[3] <= 5.0 and b.slept[4] <= 5.0 and b.slept[2] > b.slept[0]


def test_429_honours_retry_after(fake):
    b = make(fake, max_backoff=30)
    fake.faults.extend([("status", 429, {"Retry-After": "7"}, {}), ("status", 429, {"Retry-After": "100"}, {}), ("status", 408, {}, {})])
    b.generate(["hi"], GenerationParams())
    assert b.slept[:2] == [7.0, 30.0] and 1.0 <= b.slept[2] <= 2.0  # the 408 backs off as retry 2
    assert b.stats["http_429"] == 2 and b.stats["http_408"] == 1


@pytest.mark.parametrize("status, hint", [(400, "rejected the request"), (404, "not found on the server"), (422, "rejected")])
def test_other_4xx_fail_at_once(fake, status, hint):
    b = make(fake)
    fake.faults.append(("status", status, {}, {"error": {"message": "max_tokens is too large " + "x" * 400}}))
    with pytest.raises(UserError) as e:
        b.generate(["hi"], GenerationParams())
    msg = str(e.value)
    assert f"{fake.url}/chat/completions" in msg and f"HTTP {status}" in msg and "max_tokens is too large" in msg and hint in msg
    assert "x" * 201 not in msg and "\n" not in msg
    assert b.stats["attempts"] == 1 and b.slept == []


def test_exhausted_retries(fake):
    b = make(fake, max_retries=2)
    fake.faults.extend([("status", 503, {}, {"error": {"message": "loading"}})] * 3)
    with pytest.raises(UserError, match=r"openai server .*HTTP 503 \(loading\) after 3 attempts; check that the server is up"):
        b.generate(["hi"], GenerationParams())
    assert (b.stats["attempts"], b.stats["retries"], b.stats["failures"]) == (3, 2, 1)


def test_connection_refused_is_retried(fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    b = OpenAIBackend(f"openai:http://127.0.0.1:{port}/v1#toy", max_retries=1)
    b._sleep = lambda s: None
    with pytest.raises(UserError, match="cannot connect .* after 2 attempts"):
        b.generate(["hi"], GenerationParams())
    assert b.stats["connection_errors"] == 2


# ---------------------------------------------------------------- the API key
def test_api_key_is_sent_but_never_shown(fake, monkeypatch, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    make(fake).generate(["no key"], GenerationParams())
    assert "Authorization" not in fake.requests[-1]["headers"]
    monkeypatch.setenv("MY_KEY", KEY)
    monkeypatch.setenv("CAI_OPENAI_API_KEY_ENV", "MY_KEY")
    b = make(fake, max_retries=1)
    b.generate(["hi"], GenerationParams())
    assert fake.requests[-1]["headers"]["Authorization"] == f"Bearer {KEY}"
    errors = []
    fake.faults.extend([("status", 503, {}, {"error": {"message": f"bad key {KEY}"}})] * 2 + [("status", 401, {}, {"error": {"message": f"Incorrect API key provided: {KEY}"}})])
    for _ in range(2):
        with pytest.raises(UserError) as e:
            b.generate(["hi"], GenerationParams())
        errors.append(str(e.value))
    assert "MY_KEY" in errors[1] and "check the API key" in errors[1]
    shown = " ".join(errors + [repr(b), b.name, str(b.stats), str(vars(b).get("_opener")), caplog.text, *capsys.readouterr()])
    assert KEY not in shown and "SECRET" not in shown


# ---------------------------------------------------------------- concurrency
@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_is_bounded(fake, limit):
    fake.delay = 0.05
    out = make(fake, max_concurrency=limit).generate([f"q{i}" for i in range(8)], GenerationParams(max_new_tokens=100))
    assert [o.split(" seed")[0] for o in out] == [f"echo: q{i}" for i in range(8)]
    assert fake.max_active == limit


# ---------------------------------------------------------------- option log-probs
PROMPTS = ["Answer: (", "Is it? "]
OPTIONS = [["A)", "B)"], [" yes", " yen", "maybe so"]]
BRUTE = [[lp(o) for o in opts] for opts in OPTIONS]


def rows(expected: list[list[float]]) -> list:
    return [pytest.approx(r) for r in expected]


@pytest.mark.parametrize("bos", ["", "<s>"])
def test_option_logprobs_by_echo(fake, bos):
    fake.bos = bos
    b = make(fake, logprobs_mode="echo")
    assert b.option_logprobs(PROMPTS, OPTIONS) == rows(BRUTE)
    assert all(r["body"]["echo"] and r["body"]["logprobs"] == 1 and r["body"]["max_tokens"] == 1 for r in fake.requests)
    assert {r["body"]["prompt"] for r in fake.requests} == {p + o for p, opts in zip(PROMPTS, OPTIONS) for o in opts}
    assert b.sequence_logprobs(["Q: ", "Q: "], ["abc", "xyz"]) == pytest.approx([lp("abc"), lp("xyz")])


def test_echo_option_must_start_at_a_token_boundary(fake):
    fake.merge = "xy"
    with pytest.raises(UserError, match="does not start at a token boundary"):
        make(fake, logprobs_mode="echo").option_logprobs(["abx"], [["yz"]])


@pytest.mark.parametrize("layout", ["completions", "content"])
def test_option_logprobs_by_top_k(fake, layout):
    fake.top_format = layout
    b = make(fake, logprobs_mode="top")
    b.tokenizer = CharTok()
    got = b.option_logprobs(PROMPTS[1:], OPTIONS[1:2])
    # ' ', 'y', 'e', 's' are in the toy's top 20; 'n' is not and scores the smallest listed (-0.5)
    assert "n" not in top(20) and min(top(20).values()) == -0.5
    assert got[0][:2] == pytest.approx([lp(" yes"), lp(" ye") - 0.5])
    assert b.stats["option_not_in_top"] == sum(c not in top(20) for c in "maybe so") + 1
    assert got[0][2] >= lp("maybe so")  # an upper bound
    prompts = [r["body"]["prompt"] for r in fake.requests if r["body"]["prompt"].startswith("Is it? ")]
    assert set(prompts) >= {"Is it? ", "Is it?  ", "Is it?  y", "Is it?  ye"}
    assert all(r["body"]["logprobs"] == 20 and "echo" not in r["body"] for r in fake.requests)


def test_auto_falls_back_from_echo_to_top(fake):
    fake.echo_ok = False
    b = make(fake)
    b.tokenizer = CharTok()
    assert b.option_logprobs(["Is it? "], [[" yes"]]) == rows([[lp(" yes")]])
    assert b.logprobs_mode == "top"
    n = len(fake.requests)
    b.option_logprobs(["Is it? "], [[" yes"]])
    assert not any(r["body"].get("echo") for r in fake.requests[n:])
    fake.echo_ok = True
    auto = make(fake)
    assert auto.option_logprobs(PROMPTS, OPTIONS) == rows(BRUTE) and auto.logprobs_mode == "echo"


def test_no_logprobs_names_the_capability(fake):
    fake.logprobs_ok = False
    b = make(fake)
    b.tokenizer = CharTok()
    with pytest.raises(UserError, match="returns no log-probabilities on /completions .*no top logprobs"):
        b.option_logprobs(["Is it? "], [[" yes"]])
    with pytest.raises(UserError, match="no echo logprobs"):
        make(fake, logprobs_mode="echo").option_logprobs(["Is it? "], [[" yes"]])


def test_option_argument_errors(fake):
    b = make(fake)
    with pytest.raises(UserError, match="empty option"):
        b.option_logprobs(["p"], [["a", ""]])
    with pytest.raises(UserError, match="no options"):
        b.option_logprobs(["p"], [[]])
    with pytest.raises(ValueError):
        b.option_logprobs(["p", "q"], [["a"]])
    assert fake.requests == []


def test_auto_mode_drops_echo_that_disagrees_with_next_token_logprobs(fake, caplog):
    """llama-cpp-python 0.3's echo log-probs are shifted by a token; the first call's probe notices
    (the greedy next token scores differently by echo and by top log-probs) and top mode is used."""
    fake.echo_shift = True
    b = make(fake)
    b.tokenizer = CharTok()
    prompts, options = ["Which one? The answer is:", "zzz:"], [[" cb", " bc"], [" d"]]  # chars inside the toy's top 20
    with caplog.at_level(logging.WARNING):
        got = b.option_logprobs(prompts, options)
    assert [pytest.approx(row) for row in got] == [[lp(o) for o in opts] for opts in options]
    assert b.logprobs_mode == "top" and b.stats["echo_disagrees"] == 1
    assert "disagree" in caplog.text


def test_auto_mode_keeps_echo_that_agrees(fake):
    b = make(fake)
    assert b.option_logprobs(["The answer is:"], [[" ab", " ba"]])[0] == pytest.approx([lp(" ab"), lp(" ba")])
    assert b.logprobs_mode == "echo" and not b.stats.get("echo_disagrees")


def test_top_mode_sends_each_shared_prefix_once(fake):
    """" (A)" and " (B)" share " (": the requests for a shared beginning are not repeated."""
    b = make(fake, logprobs_mode="top")
    b.tokenizer = CharTok()
    got = b.option_logprobs(["P:", "Q:"], [[" cb", " cd"], [" cb", " cd"]])
    assert [pytest.approx(row) for row in got] == [[lp(" cb"), lp(" cd")]] * 2
    sent = [r["body"]["prompt"] for r in fake.requests]
    assert sorted(sent) == sorted({"P:", "P: ", "P: c", "Q:", "Q: ", "Q: c"}) and len(sent) == 6


def test_a_stage_batch_size_bounds_the_requests_in_flight(monkeypatch):
    from constitutional.backends.openai import OpenAIBackend

    monkeypatch.delenv("CAI_OPENAI_MAX_CONCURRENCY", raising=False)
    assert OpenAIBackend("openai:http://127.0.0.1:1/v1#m").max_concurrency == 8
    assert OpenAIBackend("openai:http://127.0.0.1:1/v1#m", max_rows=2).max_concurrency == 2
    assert OpenAIBackend("openai:http://127.0.0.1:1/v1#m", max_rows=64).max_concurrency == 8
