"""`cai sample`, and the RL-CAI data chain sample -> label -> train-pm on the tiny model."""

from __future__ import annotations

import json

import pytest

from constitutional.cli import main
from constitutional.errors import UserError
from constitutional.run import RunDir, read_jsonl
from constitutional.stages import sample


def test_k_responses_per_prompt_and_resume(tmp_path, monkeypatch, scripted):
    backend = scripted(lambda messages, j: f"reply {j} to {messages[-1]['content'][:10]}")
    monkeypatch.setattr(sample, "load_backend", lambda model, **kw: backend)
    rd = RunDir(tmp_path / "run")
    s = sample.run(sample.Config(limit=3, k=3, batch_size=2), rd)
    recs = read_jsonl(rd.path / "sample" / "pairs.jsonl")
    assert s["prompts"] == 3 and s["responses"] == 9 and s["identical_pairs"] == 0
    assert all(len(r["responses"]) == 3 and r["responses"][0].startswith("reply 0") for r in recs)
    assert all(r["split"] == "train" and r["messages"][-1]["content"] == r["prompt"] for r in recs)
    calls = len(backend.calls)
    s = sample.run(sample.Config(limit=5, k=3, batch_size=2), rd)
    assert s["sampled_now"] == 2 and len(read_jsonl(rd.path / "sample" / "pairs.jsonl")) == 5
    assert len(backend.calls) == calls + 2


def test_policy_auto_uses_this_runs_sl_cai_model(tmp_path, monkeypatch, scripted, tiny_model_dir):
    import shutil

    seen = []
    monkeypatch.setattr(sample, "load_backend", lambda model, **kw: seen.append(model) or scripted())
    rd = RunDir(tmp_path / "run")
    sample.run(sample.Config(limit=1), rd)
    shutil.copytree(tiny_model_dir, rd.path / "sft" / "model")
    sample.run(sample.Config(limit=2), rd)
    assert seen == ["embedded", str(rd.path / "sft" / "model")]
    with pytest.raises(UserError, match="at least 2"):
        sample.run(sample.Config(k=1), rd)


def test_sample_label_train_pm_chain_on_the_tiny_model(tmp_path, tiny_model_dir):
    """The three stages of RL-CAI part 1 connect through the run directory, as a user runs them."""
    run = str(tmp_path / "run")
    m = str(tiny_model_dir)
    assert main(["sample", "--run-dir", run, "--set", f"policy={m}", "--set", "limit=6", "--set", "max_new_tokens=6", "--set", "dtype=float32"]) == 0
    assert main(["label", "--run-dir", run, "--set", f"feedback_model={m}", "--set", "fewshot=1", "--set", "mc_limit=4"]) == 0
    assert main(["train-pm", "--run-dir", run, "--set", f"model={m}", "--set", "max_steps=2", "--set", "dtype=float32"]) == 0
    prefs = read_jsonl(tmp_path / "run" / "label" / "preferences.jsonl")
    assert len(prefs) == 6 and all(0.5 <= p["p_chosen"] <= 1 for p in prefs)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {"sample", "label", "train-pm"} <= {k for k, v in manifest["stages"].items() if v["status"] == "done"}
    assert (tmp_path / "run" / "train-pm" / "model" / "config.json").is_file()
