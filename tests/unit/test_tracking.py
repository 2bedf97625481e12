"""Experiment tracking (`report_to`) for the training stages, for real: TensorBoard event files that
hold each stage's loss curve (read back with TensorBoard's own reader), a W&B offline run that holds
it too, and the one-line errors (unknown tracker, a W&B server that cannot be reached)."""

from __future__ import annotations

import json
import os
import re

import pytest

from constitutional.errors import UserError
from constitutional.run import RunDir, read_jsonl
from constitutional.stages import distill, preference, rl, sft
from constitutional.training import report_targets

CLOSED = "http://127.0.0.1:9"  # nothing listens on the discard port: connection refused


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert events, f"no event file in {log_dir}"
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_report_targets(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert report_targets("none") == [] and report_targets("") == []
    assert report_targets("tensorboard") == ["tensorboard"]
    assert report_targets("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(UserError, match="sft.report_to 'mlflow': unknown tracker 'mlflow'; use none, tensorboard, wandb"):
        report_targets("mlflow", "sft.report_to")


def test_unreachable_wandb_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", CLOSED)
    from test_sft import write_revise

    run = RunDir(tmp_path / "run")
    write_revise(run)
    with pytest.raises(UserError) as e:
        sft.run(sft.Config(model="never/loaded", report_to="wandb"), run)
    msg = str(e.value)
    assert msg.startswith(f"sft.report_to wandb: cannot reach the W&B server {CLOSED}") and "WANDB_MODE=offline" in msg
    assert "\n" not in msg


def _run_sft(model_dir, run, **kw):
    from test_sft import config, write_revise

    write_revise(run)
    sft.run(config(model_dir, max_steps=3, **kw), run)
    return [(c["step"], c["loss"]) for c in json.loads((run.path / "sft" / "loss.json").read_text())]


def _run_distill(model_dir, run, tmp_path, **kw):
    from test_distill import CONTEXT, PROMPTS, config

    files = tmp_path / "files"
    files.mkdir()
    (files / "ctx.yaml").write_text(CONTEXT)
    (files / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "split": "test" if i % 3 == 0 else "train"}) + "\n"
                                                 for i, p in enumerate(PROMPTS)))
    distill.run(config(files, model_dir, max_steps=3, max_new_tokens=6, **kw), run)
    return [(c["step"], c["loss"]) for c in json.loads((run.path / "distill" / "loss.json").read_text())]


def _run_train_pm(model_dir, run, tmp_path, **kw):
    from test_preference_model import _preferences, _write_jsonl

    prefs = _write_jsonl(tmp_path / "prefs.jsonl", [dict(r, split="train") for r in _preferences()])
    preference.run(preference.Config(model=str(model_dir), preferences=str(prefs), heldout=0.0, dtype="float32", max_steps=3,
                                     batch_size=2, save_steps=0, mc="", **kw), run)
    return [(h["step"], h["loss"]) for h in json.loads((run.path / "train-pm" / "loss.json").read_text()) if "loss" in h]


def _run_rl(model_dir, run, **kw):
    from test_rl import _cfg, vowel_share

    rl.run(_cfg(model_dir, max_steps=3, num_generations=2, max_new_tokens=8, **kw), run, reward_fn=vowel_share)
    return [(r["step"], r["rl/loss"]) for r in read_jsonl(run.path / "rl" / "metrics.jsonl")]


@pytest.mark.parametrize("stage", ["sft", "train-pm", "rl", "distill"])
def test_tensorboard_event_files_hold_the_loss_curve(stage, tiny_model_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    kw = {"report_to": "tensorboard"}
    curve = {
        "sft": lambda: _run_sft(tiny_model_dir, run, **kw),
        "train-pm": lambda: _run_train_pm(tiny_model_dir, run, tmp_path, **kw),
        "rl": lambda: _run_rl(tiny_model_dir, run, **kw),
        "distill": lambda: _run_distill(tiny_model_dir, run, tmp_path, **kw),
    }[stage]()
    assert [s for s, _ in curve] == [1, 2, 3]
    logged = tensorboard_scalars(run.path / stage / "logs", "train/loss")
    assert [s for s, _ in logged] == [1, 2, 3]
    assert [v for _, v in logged] == pytest.approx([v for _, v in curve], rel=1e-6)  # event files hold float32
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # the stage's directory does not leak into the next stage


def wandb_history(run_file, key: str) -> list[float]:
    """The values logged under `key`, read from a W&B offline run file (protobuf items: field 2 =
    key, field 16 = value_json). Each logged row is written twice in a row (the history record and
    the summary update), so repeats are dropped."""
    data = run_file.read_bytes()
    k = key.encode()
    pattern = re.escape(bytes([0x12, len(k)]) + k + b"\x82\x01") + rb"(.)"
    values = [json.loads(data[m.end() : m.end() + m.group(1)[0]]) for m in re.finditer(pattern, data, re.DOTALL)]
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def test_wandb_offline_run_holds_the_loss_curve(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run = RunDir(tmp_path / "run")
    curve = _run_sft(tiny_model_dir, run, report_to="wandb")
    (run_file,) = (run.path / "sft" / "wandb").glob("offline-run-*/run-*.wandb")
    assert wandb_history(run_file, "train/loss") == [v for _, v in curve]
    assert "WANDB_DIR" not in os.environ
