"""`cai chat` in a real terminal: tmux runs it, `send-keys` types, `capture-pane` reads the screen.

Two parrot models (tests/conftest.py) stand for a run's `base` and `sl-cai`: each answers every
prompt with its own phrase, so the screen shows whether each model's answer arrived under its name.
Needs Debian's `tmux` (`make test` installs it; by hand: `apt-get update && apt-get install -y tmux`);
where it is missing the test fails with that instruction, or skips when CAI_SKIP_TERMINAL=1.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="module")
def tmux() -> str:
    exe = shutil.which("tmux")
    if exe is None:
        if os.environ.get("CAI_SKIP_TERMINAL") == "1":
            pytest.skip("tmux is not installed and CAI_SKIP_TERMINAL=1")
        pytest.fail("the chat's terminal test needs Debian's tmux: install it with `apt-get update && apt-get install -y tmux`, "
                    "or set CAI_SKIP_TERMINAL=1 to skip this test")
    return exe


class Terminal:
    """A detached tmux session on a private server socket, 120 x 40."""

    def __init__(self, exe: str, command: str):
        self.base = [exe, "-L", f"cai-test-{os.getpid()}"]
        subprocess.run(self.base + ["new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", command], check=True)

    def type(self, text: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "chat", "-l", text], check=True)
        subprocess.run(self.base + ["send-keys", "-t", "chat", "Enter"], check=True)

    def screen(self) -> str:
        res = subprocess.run(self.base + ["capture-pane", "-p", "-J", "-t", "chat"], capture_output=True, text=True)
        return res.stdout

    def wait_for(self, predicate, what: str, timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(self.base + ["has-session", "-t", "chat"], capture_output=True).returncode == 0

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True)


def test_chat_session_in_tmux(tmux, parrot_dirs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"name": "run", "pipeline": {"model": str(parrot_dirs[0])}, "stages": {}}))
    shutil.copytree(parrot_dirs[1], run / "sft" / "model")
    env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "HOME", "PATH") if k in os.environ}
    command = " ".join(["env", *(f"{k}={shlex.quote(v)}" for k, v in env.items()), "TOKENIZERS_PARALLELISM=false",
                        shlex.quote(sys.executable), "-m", "constitutional.cli", "chat", "--run-dir", shlex.quote(str(run)),
                        "--dtype", "float32", "--max-new-tokens", "16"])
    term = Terminal(tmux, command)
    try:
        screen = term.wait_for(lambda s: "you> " in s, "the prompt")
        assert "chatting with base, sl-cai." in screen
        term.type("How do I bake bread?")
        screen = term.wait_for(lambda s: s.count("you> ") >= 2, "both answers")
        lines = [line.rstrip() for line in screen.splitlines()]
        i = lines.index("you> How do I bake bread?")
        assert lines[i + 1 : i + 3] == ["[base] Knead the dough well.", "[sl-cai] The answer is (A)."]
        term.type("/system Be brief.")
        term.wait_for(lambda s: "(system prompt set; conversation started over)" in s, "the /system reply")
        term.type("Hello")
        screen = term.wait_for(lambda s: s.count("you> ") >= 4, "the answers after /system")
        assert screen.count("[base] Knead the dough well.") == 2 and screen.count("[sl-cai] The answer is (A).") == 2
        term.type("/reset")
        term.wait_for(lambda s: "(conversation started over)" in s, "the /reset reply")
        term.type("/quit")
        deadline = time.time() + 30
        while term.alive() and time.time() < deadline:
            time.sleep(0.2)
        assert not term.alive()  # the program ended, and tmux closed its window
    finally:
        term.close()
