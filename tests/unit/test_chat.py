"""`cai chat`: run-relative model names, the session commands, streamed answers equal to the
backend's own (plain and `prompted:`), and the one-shot `--prompt` mode through the CLI. The parrot
models (tests/conftest.py) answer every prompt with a fixed phrase, so answers can be checked."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from constitutional.backends.base import GenerationParams
from constitutional.chat import Chat, default_models, resolve, stream
from constitutional.errors import UserError

CAI = [sys.executable, "-m", "constitutional.cli"]
GREEDY = GenerationParams(max_new_tokens=16, temperature=0.0)
CONTEXT = """instructions: Be helpful, honest and harmless.
examples:
  - |-
    Human: Hello

    Assistant: Hello! How can I help?
"""


def make_run(tmp_path, base: str, sl_cai=None):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"name": "run", "pipeline": {"model": base}, "stages": {}}))
    if sl_cai is not None:
        shutil.copytree(sl_cai, run / "sft" / "model")
    return run


def test_run_relative_names(tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "model").mkdir(parents=True)
    (run / "sft" / "model" / "config.json").write_text("{}")
    (run / "manifest.json").write_text(json.dumps({"config": {"sft": {"model": "some/base"}}}))
    sl = str(run / "sft" / "model")
    assert resolve("base", run) == "some/base" and resolve("base", None) == "embedded"
    assert resolve("sl-cai", run) == sl and resolve("prompted:sl-cai", run) == f"prompted:{sl}"
    assert resolve("prompted:ctx.yaml#sl-cai", run) == f"prompted:ctx.yaml#{sl}"
    assert resolve("prompted:embedded", run) == "prompted:embedded" and resolve("openai:http://h:1/v1#m", run) == "openai:http://h:1/v1#m"
    assert default_models(run) == ["base", "sl-cai"] and default_models(None) == ["base"]
    with pytest.raises(UserError, match=r"'rl-cai': .*rl/model has no model; run `cai rl` first"):
        resolve("rl-cai", run)
    with pytest.raises(UserError, match="needs --run-dir"):
        resolve("dpo", None)


def test_session_commands_and_the_non_streaming_path(scripted):
    def reply(name):
        return lambda messages, j: f"{name} saw {[m['role'] for m in messages]}"

    chat = Chat([("a", scripted(reply("a"))), ("b", scripted(reply("b")))], GREEDY)
    out = io.StringIO()
    assert chat.ask("hi", out) == {"a": "a saw ['user']", "b": "b saw ['user']"}
    assert chat.ask("again", out)["b"] == "b saw ['user', 'assistant', 'user']"  # each model keeps its own turns
    assert chat.turns["a"][1] == {"role": "assistant", "content": "a saw ['user']"}
    assert out.getvalue().splitlines()[:2] == ["[a] a saw ['user']", "[b] b saw ['user']"]
    assert chat.command("/system Be brief.", out) and chat.turns == {"a": [], "b": []}
    assert chat.ask("hi", out)["a"] == "a saw ['system', 'user']"
    assert chat.command("/system", out) and chat.system == ""
    chat.ask("x", out)
    assert chat.command("/reset", out) and chat.turns == {"a": [], "b": []}
    assert chat.command("/nope", out) and "unknown command /nope" in out.getvalue()
    assert chat.command("/quit", out) is False


def test_control_characters_never_reach_the_terminal(scripted):
    chat = Chat([("a", scripted(lambda m, j: "clear\x1b[2J\rscreen"))], GREEDY)
    out = io.StringIO()
    assert chat.ask("hi", out)["a"] == "clear\x1b[2J\rscreen"  # the conversation keeps the text as generated
    assert out.getvalue() == "[a] clear\ufffd[2J\ufffdscreen\n"


def test_streamed_answers_equal_the_backends(parrot_dirs, tmp_path):
    from constitutional.backends import load_backend
    from constitutional.backends.prompted import PromptedBackend
    from constitutional.context import load_context

    (tmp_path / "ctx.yaml").write_text(CONTEXT)
    for model in parrot_dirs:
        backend = load_backend(str(model), dtype="float32")
        prompted = PromptedBackend(backend, load_context(tmp_path / "ctx.yaml"))
        for conv in ([{"role": "user", "content": "How do I bake bread?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "abc"}]):
            for b in (backend, prompted):
                assert "".join(stream(b, conv, GREEDY)).strip() == b.generate([conv], GREEDY)[0]  # the backend strips its answers too
    backend = load_backend(str(parrot_dirs[0]), dtype="float32")
    assert "".join(stream(backend, [{"role": "user", "content": "Hello"}], GREEDY)) == "Knead the dough well."
    with pytest.raises(UserError, match=r"with 5000 new ones more than the model's 4096; /reset to start over"):
        list(stream(backend, [{"role": "user", "content": "Hello"}], GenerationParams(max_new_tokens=5000)))


def test_one_shot_mode_prints_each_models_answer(parrot_dirs, tmp_path):
    run = make_run(tmp_path, str(parrot_dirs[0]), sl_cai=parrot_dirs[1])
    argv = CAI + ["chat", "--run-dir", str(run), "--prompt", "How do I bake bread?", "--dtype", "float32", "--max-new-tokens", "16"]
    res = subprocess.run(argv + ["-m", "base", "-m", "sl-cai"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout == "[base] Knead the dough well.\n[sl-cai] The answer is (A).\n"
    assert subprocess.run(argv, capture_output=True, text=True).stdout == res.stdout  # default: base and what the run trained
    bad = subprocess.run(argv + ["-m", "rl-cai"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "run `cai rl` first" in bad.stderr
