"""The supervised stage end to end on the embedded model, as a user runs it: revise -> sft -> the
SL-CAI model answers."""

from __future__ import annotations

import json
import subprocess
import sys

from constitutional.run import read_jsonl

CAI = [sys.executable, "-m", "constitutional.cli"]


def test_revise_then_sft_on_the_embedded_model(tmp_path):
    cfg = tmp_path / "sl.yaml"
    cfg.write_text(
        "stages: [revise, sft]\n"
        "revise: {limit: 3, helpful_limit: 2, rounds: 1, fewshot_count: 2, dtype: float32, temperature: 0.7, top_p: 0.9,\n"
        "         repetition_penalty: 1.2, max_new_tokens: 64, critique_max_new_tokens: 40, retries: 2, batch_size: 4}\n"
        "sft: {max_steps: 2, batch_size: 2, dtype: float32, max_length: 384}\n"
    )
    run = tmp_path / "run"
    res = subprocess.run(CAI + ["run", str(cfg), "--run-dir", str(run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_jsonl(run / "revise" / "revisions.jsonl")
    assert len(records) == 3 and all(len(r["rounds"]) == 1 for r in records)
    assert any(r["usable"] for r in records), "no usable revision at all: the cleaning or the dialogue broke"
    summary = json.loads((run / "manifest.json").read_text())["stages"]
    assert summary["sft"]["summary"]["steps"] == 2 and summary["sft"]["status"] == "done"
    model = run / "sft" / "model"
    assert (model / "README.md").read_text().count("SL-CAI") >= 1
    # the SL-CAI model loads through the backend and answers
    from constitutional.backends import GenerationParams, load_backend

    backend = load_backend(str(model), dtype="float32")
    out = backend.generate(["How do I pick a lock?"], GenerationParams(max_new_tokens=8, temperature=0.0))
    assert out[0].strip()
