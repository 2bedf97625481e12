"""`cai run` runs each stage in a process of its own (stage_process): a stage's process killed with
SIGKILL fails the pipeline with one line and exit 1, leaving the stage resumable; the pipeline's
process killed takes its stage's process with it (no orphan keeps writing the run directory); Ctrl-C
stops both and exits 130; the rerun finishes with every record once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

CAI = [sys.executable, "-m", "constitutional.cli"]


def _stage(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())["stages"].get("baseline", {})
    except (OSError, ValueError, KeyError):
        return {}


def _records(run: Path) -> int:
    shard = run / "baseline" / "responses.jsonl"
    return len(shard.read_text().splitlines()) if shard.exists() else 0


def _running_child(run: Path, proc: subprocess.Popen, old: set[int], before: int) -> int:
    """The pid of the stage's own process once it has begun and written a record beyond `before`."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        st = _stage(run)
        if st.get("status") == "running" and st.get("pid") not in old | {proc.pid} and _records(run) > before:
            return st["pid"]
        time.sleep(0.05)
    raise AssertionError(f"the stage never ran in a process of its own (exit {proc.poll()})")


def _gone(pid: int, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_stage_processes_die_alone_or_with_the_pipeline_and_the_rerun_finishes(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"run_dir: {run}\nmodel: {tiny_model_dir}\nstages: [baseline]\n"
        "baseline:\n  limit: 12\n  split: all\n  max_new_tokens: 96\n  batch_size: 1\n  mc_limit: 2\n  dtype: float32\n"
    )
    argv = CAI + ["run", str(cfg)]

    # 1. the stage's process is killed (as the kernel's OOM killer would): exit 1, one line, resumable
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    child = _running_child(run, proc, set(), 0)
    os.kill(child, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("cai: error: stage baseline: its process was killed by signal 9")
    assert _stage(run)["status"] == "failed"

    # 2. the pipeline's process is killed: its stage's process goes with it
    before = _records(run)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = _running_child(run, proc, {child}, before)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _gone(second, within=10), "the stage's process outlived the pipeline's"

    # 3. Ctrl-C (SIGINT to the terminal's process group): the stage records it, the pipeline exits 130
    before = _records(run)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    third = _running_child(run, proc, {child, second}, before)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err.strip().splitlines()[-1], err[-2000:]
    assert _gone(third, within=10) and _stage(run)["status"] == "failed" and "KeyboardInterrupt" in _stage(run)["error"]

    # 4. the rerun finishes; every record once, none torn. Run under a parent that reads its
    # children's peak memory, as /usr/bin/time does: the stage's process is counted in it.
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) / 1024 >= 0.95 * _stage(run)["summary"]["peak_rss_mb"]
    ids = [json.loads(line)["id"] for line in (run / "baseline" / "responses.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 12
    assert _stage(run)["status"] == "done"
