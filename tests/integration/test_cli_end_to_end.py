"""The CLI as a user runs it, on the embedded model: a stage, kill -9, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from constitutional.run import read_jsonl

CAI = [sys.executable, "-m", "constitutional.cli"]


def test_models_command():
    res = subprocess.run(CAI + ["models"], capture_output=True, text=True)
    assert res.returncode == 0
    assert "smollm2-135m-instruct" in res.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" in res.stdout


def test_baseline_survives_kill_9_and_resumes(tmp_path):
    run = tmp_path / "run"
    argv = CAI + ["baseline", "--run-dir", str(run), "--set", "batch_size=1", "--set", "limit=6",
                  "--set", "max_new_tokens=24", "--set", "mc_limit=8", "--set", "split=train"]
    shard = run / "baseline" / "responses.jsonl"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if shard.exists() and shard.read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [r["id"] for r in read_jsonl(shard)]
    assert 2 <= len(before) < 6
    assert json.loads((run / "manifest.json").read_text())["stages"]["baseline"]["status"] == "running"
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    after = [r["id"] for r in read_jsonl(shard)]
    assert after[: len(before)] == before and len(after) == len(set(after)) == 6
    m = json.loads((run / "manifest.json").read_text())
    st = m["stages"]["baseline"]
    assert st["status"] == "done" and st["summary"]["mc_items"] == 8
    assert m["versions"]["torch"] and "config" in m
    # a rerun with the same config is skipped
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0 and "already done" in res.stderr
