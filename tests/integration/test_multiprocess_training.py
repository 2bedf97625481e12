"""`cai sft`, `cai train-pm` and `cai rl` as 2 training processes on the CPU (gloo), the way a user
starts them on N GPUs: `accelerate launch --config_file configs/accelerate/<...>.yaml -m constitutional.cli <stage>`.

On the embedded model, a few steps each. Checked: each stage finishes on 2 processes, the main process
alone writes the manifest, the metrics and one saved model (no checkpoints or temp folders left); and
data parallelism is exact: 2 processes with batch 2 each give the same losses and the same weights as
one process with batch 2 and 2 accumulation steps (float32); and a 2-process run killed with
SIGKILL after its second checkpoint resumes to the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
TOPICS = ["pick a lock", "make a fake ID", "insult my coworker", "cheat on a test", "hack wifi", "steal a bike", "lie to my boss", "skip taxes"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(stage: str, run: Path, *sets: str) -> list[str]:
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIG), "--main_process_port", str(_port()),
           "-m", "constitutional.cli", stage, "--run-dir", str(run)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def launch(stage: str, run: Path, *sets: str) -> subprocess.CompletedProcess:
    return subprocess.run(launch_cmd(stage, run, *sets), capture_output=True, text=True, timeout=900, cwd=ROOT)


def single(stage: str, run: Path, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "constitutional.cli", stage, "--run-dir", str(run)]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def write_inputs(run: Path) -> None:
    (run / "revise").mkdir(parents=True)
    (run / "label").mkdir(parents=True)
    with open(run / "revise" / "revisions.jsonl", "w") as f:
        for i, t in enumerate(TOPICS):
            answer = f"I can't help you {t}, but I can suggest a legal alternative."
            f.write(json.dumps({"id": f"r{i}", "prompt": f"How do I {t}?", "usable": True, "initial_response": "Sure, here is how.",
                                "rounds": [{"principle_id": "harmful", "status": "ok", "critique": "It helps with harm.", "revision": answer}],
                                "final_response": answer}) + "\n")
    with open(run / "label" / "preferences.jsonl", "w") as f:
        for i in range(16):
            t = TOPICS[i % 8]
            f.write(json.dumps({"id": f"c{i}", "prompt": f"How do I {t}? ({i})", "chosen": f"I won't help to {t}; here is a safer option.",
                                "rejected": f"Sure! To {t}, first do this.", "p_chosen": 0.8 if i % 3 else 0.6}) + "\n")


def done(run: Path, stage: str) -> dict:
    st = json.loads((run / "manifest.json").read_text())["stages"][stage]
    assert st["status"] == "done", st
    return st["summary"]


def model_files(path: Path) -> set[str]:
    return {f.name for f in path.iterdir()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mp") / "run"
    write_inputs(run)
    return run


def test_sft_on_two_processes_equals_one_process_with_accumulation(run, tmp_path):
    from safetensors.torch import load_file

    common = ("max_steps=2", "batch_size=2", "dtype=float32", "save_steps=1", "helpful=none")
    two = launch("sft", run, *common)
    assert two.returncode == 0, two.stderr[-3000:]
    summary = done(run, "sft")
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert two.stderr.count("[sft] done in") == 1  # the main process reports, once
    out = run / "sft"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= model_files(out / "model")
    assert "training_args.bin" not in model_files(out / "model")
    assert not (out / "checkpoints").exists() and not list(out.glob(".model.tmp*"))
    assert [s["step"] for s in json.loads((out / "loss.json").read_text())] == [1, 2]

    one_run = tmp_path / "one"
    (one_run / "revise").mkdir(parents=True)
    (one_run / "revise" / "revisions.jsonl").write_bytes((run / "revise" / "revisions.jsonl").read_bytes())
    one = single("sft", one_run, *common, "grad_accum=2")
    assert one.returncode == 0, one.stderr[-3000:]
    # the same losses up to float32 summation order (padding-free batches pack each process's rows differently)
    two_losses, one_losses = (json.loads((d / "loss.json").read_text()) for d in (out, one_run / "sft"))
    assert [x["step"] for x in two_losses] == [x["step"] for x in one_losses]
    assert [x["loss"] for x in two_losses] == pytest.approx([x["loss"] for x in one_losses], rel=1e-5)
    a, b = load_file(out / "model" / "model.safetensors"), load_file(one_run / "sft" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 1e-5, f"2-process weights differ from 1 process x 2 accumulation steps by {diff}"


def test_train_pm_then_rl_on_two_processes(run):
    if not (run / "sft" / "model").is_dir():
        pytest.skip("needs the SFT model of the test above")
    pm = launch("train-pm", run, "model=embedded", "max_steps=2", "batch_size=2", "dtype=float32", "save_steps=1", "mc=")
    assert pm.returncode == 0, pm.stderr[-3000:]
    summary = done(run, "train-pm")
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["heldout_accuracy"] is not None
    assert {"config.json", "model.safetensors", "README.md"} <= model_files(run / "train-pm" / "model")
    assert not (run / "train-pm" / "checkpoints").exists() and not (run / "train-pm" / ".model.tmp").exists()

    rl = launch("rl", run, "max_steps=2", "batch_size=1", "num_generations=2", "max_new_tokens=16", "dtype=float32",
                "save_steps=1", "limit=4", "eval_prompts=2")
    assert rl.returncode == 0, rl.stderr[-3000:]
    summary = done(run, "rl")
    assert summary["processes"] == 2 and summary["steps"] == 2 and summary["eval"]["prompts"] == 4
    steps = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [s["id"] for s in steps] == ["step-000001", "step-000002"]  # one writer: no step twice
    assert {"config.json", "model.safetensors", "README.md"} <= model_files(run / "rl" / "model")
    assert not (run / "rl" / "checkpoints").exists()
    assert rl.stderr.count("[rl] done in") == 1


def test_generation_stage_refuses_several_processes(run):
    r = launch("revise", run)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("cai: error:")]
    assert len(lines) == 1 and "runs in one process" in lines[0], r.stderr[-2000:]


def test_two_process_sft_killed_mid_way_resumes_to_the_same_model(tmp_path):
    """kill -9 of the launcher and of its workers (torchrun starts them in their own sessions, so
    killing the launcher alone leaves them running, holding the lock) after checkpoint 2 of 4; the
    rerun resumes from it and ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    sets = ("max_steps=4", "batch_size=1", "dtype=float32", "save_steps=1", "helpful=none")
    write_inputs(tmp_path / "inputs")
    runs = {}
    for name in ("whole", "killed"):
        runs[name] = tmp_path / name
        (runs[name] / "revise").mkdir(parents=True)
        (runs[name] / "revise" / "revisions.jsonl").write_bytes((tmp_path / "inputs" / "revise" / "revisions.jsonl").read_bytes())
    whole = launch("sft", runs["whole"], *sets)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = runs["killed"]
    proc = subprocess.Popen(launch_cmd("sft", run, *sets), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (run / "sft" / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", f"constitutional.cli sft --run-dir {run}"])
    proc.wait()
    time.sleep(1)
    assert not (run / "sft" / "model").exists()
    again = launch("sft", run, *sets)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[sft] resuming from" in again.stderr
    summary = done(run, "sft")
    assert summary["resumed_from_step"] >= 2 and summary["steps"] == 4
    losses = {n: [round(x["loss"], 5) for x in json.loads((r / "sft" / "loss.json").read_text())] for n, r in runs.items()}
    assert losses["killed"] == losses["whole"] and len(losses["whole"]) == 4
    a, b = (load_file(r / "sft" / "model" / "model.safetensors") for r in runs.values())
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
