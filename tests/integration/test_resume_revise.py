"""`cai revise` killed with SIGKILL mid-run and rerun: every prompt ends up in the records exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from constitutional.run import read_jsonl

CAI = [sys.executable, "-m", "constitutional.cli"]


def test_revise_survives_kill_9_and_every_prompt_ends_up_once(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    n = 12
    argv = CAI + ["revise", "--run-dir", str(run), "--set", f"model={tiny_model_dir}", "--set", "dtype=float32",
                  "--set", "batch_size=1", "--set", f"limit={n}", "--set", "rounds=2", "--set", "fewshot_count=1",
                  "--set", "max_new_tokens=12", "--set", "critique_max_new_tokens=8", "--set", "helpful_limit=3", "--set", "retries=0"]
    shard = run / "revise" / "revisions.jsonl"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (shard.exists() and shard.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the shard may end in a torn line
    proc.wait()
    before = [r["id"] for r in read_jsonl(shard)]
    assert 3 <= len(before) < n, "the kill must land mid-run"
    assert json.loads((run / "manifest.json").read_text())["stages"]["revise"]["status"] == "running"

    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    records = read_jsonl(shard)
    ids = [r["id"] for r in records]
    assert ids[: len(before)] == before  # finished prompts were kept, not redone
    assert len(ids) == len(set(ids)) == n  # every prompt exactly once
    assert all(len(r["rounds"]) == 2 for r in records)
    assert len(read_jsonl(run / "revise" / "helpful.jsonl")) == 3
    summary = json.loads((run / "manifest.json").read_text())["stages"]["revise"]["summary"]
    assert summary["prompts"] == n and summary["processed_now"] == n - len(before)
