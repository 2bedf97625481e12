"""revise, sample, label and eval killed with SIGKILL at random moments, five times each, then let to
finish: no record is lost, duplicated or torn.

Each stage runs as the CLI on the tiny random Llama with a small batch, so that its work spreads
over many scheduler steps and a kill lands while records are being written."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

CAI = [sys.executable, "-m", "constitutional.cli"]
KILLS = 5


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def _kill_five_times_then_finish(argv: list[str], watch: Path, rng: random.Random) -> int:
    """Start `argv`, wait until `watch` has grown by a record (or the process ended), then kill it
    after a random delay; five times. Returns how many kills landed mid-run."""
    landed = 0
    for _ in range(KILLS):
        before = len(_lines(watch))
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and len(_lines(watch)) <= before:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))  # soon after a record: on an idle machine the stage's rest can take under 0.6 s
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait()
    res = subprocess.run(argv, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return landed


def _check(path: Path, expected: set[str]) -> None:
    lines = _lines(path)
    records = [json.loads(line) for line in lines]  # every line whole: nothing torn
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a record was written twice"
    assert set(ids) == expected, "a record is missing or unexpected"


def test_generation_stages_survive_five_random_kills(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--set", "dtype=float32"]
    tiny = str(tiny_model_dir)

    # revise: 12 chains of 2 rounds + 4 helpful prompts, two rows decoding at a time
    revise = CAI + ["revise", *common, "--set", f"model={tiny}", "--set", "batch_size=2", "--set", "limit=12",
                    "--set", "rounds=2", "--set", "fewshot_count=1", "--set", "max_new_tokens=16",
                    "--set", "critique_max_new_tokens=8", "--set", "helpful_limit=4", "--set", "retries=1"]
    landed = _kill_five_times_then_finish(revise, run / "revise" / "revisions.jsonl", rng)
    revisions = [json.loads(x) for x in _lines(run / "revise" / "revisions.jsonl")]
    assert len(revisions) == 12 and all(len(r["rounds"]) == 2 for r in revisions)
    _check(run / "revise" / "revisions.jsonl", {r["id"] for r in revisions})
    helpful = [json.loads(x) for x in _lines(run / "revise" / "helpful.jsonl")]
    _check(run / "revise" / "helpful.jsonl", {r["id"] for r in helpful})
    assert len(helpful) == 4
    summary = json.loads((run / "manifest.json").read_text())["stages"]["revise"]["summary"]
    assert summary["prompts"] == 12 and summary["helpful_responses"] == sum(len(r["responses"]) for r in helpful)

    # sample: 16 prompts x 2 responses
    sample = CAI + ["sample", *common, "--set", f"policy={tiny}", "--set", "batch_size=2", "--set", "limit=16",
                    "--set", "max_new_tokens=24"]
    landed += _kill_five_times_then_finish(sample, run / "sample" / "pairs.jsonl", rng)
    pairs = [json.loads(x) for x in _lines(run / "sample" / "pairs.jsonl")]
    assert len(pairs) == 16 and all(len(p["responses"]) == 2 for p in pairs)
    _check(run / "sample" / "pairs.jsonl", {p["id"] for p in pairs})

    # label: every pair once, in both orders
    label = CAI + ["label", *common, "--set", f"feedback_model={tiny}", "--set", "batch_size=1", "--set", "mc_limit=4"]
    landed += _kill_five_times_then_finish(label, run / "label" / "preferences.jsonl", rng)
    _check(run / "label" / "preferences.jsonl", {p["id"] for p in pairs})

    # eval: two models' answers and the judge's comparisons
    evaluate = CAI + ["eval", *common, "--set", f"models=[base={tiny}, other={tiny}]", "--set", f"feedback_model={tiny}",
                      "--set", "limit=6", "--set", "max_new_tokens=16", "--set", "sections=[harmlessness, refusal]",
                      "--set", "batch_size=2", "--set", "bootstrap=20"]
    landed += _kill_five_times_then_finish(evaluate, run / "eval" / "answers" / "other.jsonl", rng)
    for name in ("base", "other"):
        answers = [json.loads(x) for x in _lines(run / "eval" / "answers" / f"{name}.jsonl")]
        _check(run / "eval" / "answers" / f"{name}.jsonl", {a["id"] for a in answers})
        assert len(answers) == 6 + len([1 for a in answers if a["set"] == "benign"])
    assert json.loads((run / "eval" / "results.json").read_text())["refusal"]["other"]["n_harmful"] == 6
    assert landed >= 12, f"only {landed} of {4 * KILLS} kills landed mid-run"
