"""The error contract, as a user meets it: bad input -> one line on stderr, exit 2, no traceback,
nothing written that a rerun would trust."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from constitutional.cli import main

MC_OK = {"prompt": "The answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}


def _files(tmp_path):
    f = {}
    f["bad_yaml"] = tmp_path / "bad.yaml"
    f["bad_yaml"].write_text("stages: [baseline\nseed: 1\n")
    f["unknown_key"] = tmp_path / "unknown.yaml"
    f["unknown_key"].write_text("stages: [baseline]\nbaseline:\n  limt: 3\n")
    f["unknown_stage"] = tmp_path / "stage.yaml"
    f["unknown_stage"].write_text("stages: [baseline, critique]\n")
    f["empty_stages"] = tmp_path / "empty.yaml"
    f["empty_stages"].write_text("run_dir: x\n")
    f["bad_jsonl"] = tmp_path / "bad.jsonl"
    f["bad_jsonl"].write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    f["empty_prompts"] = tmp_path / "empty.txt"
    f["empty_prompts"].write_text("\n\n")
    f["dup_prompts"] = tmp_path / "dup.jsonl"
    f["dup_prompts"].write_text('{"id": "1", "prompt": "a"}\n{"id": "1", "prompt": "b"}\n')
    f["long_prompt"] = tmp_path / "long.txt"
    f["long_prompt"].write_text("bread " * 5000 + "\n")
    f["ok_prompts"] = tmp_path / "ok.txt"
    f["ok_prompts"].write_text("How do I bake bread?\n")
    f["bad_mc"] = tmp_path / "mc.jsonl"
    f["bad_mc"].write_text(json.dumps({"prompt": "x"}) + "\n")
    f["empty_option"] = tmp_path / "mc_empty.jsonl"
    f["empty_option"].write_text(json.dumps({**MC_OK, "incorrects": [""]}) + "\n")
    f["manifest"] = tmp_path / "brokenrun"
    f["manifest"].mkdir()
    (f["manifest"] / "manifest.json").write_text("{not json")
    return f


def catalog(tmp_path, tiny):
    f = _files(tmp_path)
    rd = str(tmp_path / "run")
    base = ["baseline", "--run-dir", rd, "--set", f"model={tiny}", "--set", "max_new_tokens=2", "--set", "mc_limit=1"]
    return {
        "malformed YAML": (["run", str(f["bad_yaml"])], "malformed YAML"),
        "missing config file": (["run", str(tmp_path / "nope.yaml")], "file not found"),
        "unknown setting": (["run", str(f["unknown_key"])], "unknown setting 'limt'"),
        "unknown stage": (["run", str(f["unknown_stage"])], "unknown stage 'critique'"),
        "empty stage list": (["run", str(f["empty_stages"])], "stages is empty"),
        "sft before revise": (["sft", "--run-dir", rd], "run `cai revise` first"),
        "revise with a missing prompt set": (["revise", "--run-dir", rd, "--set", "prompts=builtin:redteam+run:redteam"], "run `cai redteam` first"),
        "bad --set syntax": (base + ["--set", "limit"], "expected key=value"),
        "wrong value type": (base + ["--set", "limit=many"], "expected an integer"),
        "unknown flag": (["baseline", "--frobnicate"], "unrecognized arguments"),
        "malformed JSONL prompts": (base + ["--set", f"prompts={f['bad_jsonl']}", "--set", "split=all"], "bad.jsonl:2: malformed JSON"),
        "missing prompt file": (base + ["--set", f"prompts={tmp_path / 'gone.jsonl'}"], "prompt file not found"),
        "empty prompt set": (base + ["--set", f"prompts={f['empty_prompts']}"], "empty"),
        "duplicate prompt ids": (base + ["--set", f"prompts={f['dup_prompts']}"], "duplicate id '1'"),
        "malformed multiple-choice file": (base + ["--set", f"mc={f['bad_mc']}"], "expected fields prompt, corrects, incorrects"),
        "unknown model directory": (["baseline", "--run-dir", rd, "--set", f"model={tmp_path}"], "no config.json"),
        "missing model path": (["baseline", "--run-dir", rd, "--set", f"model={tmp_path / 'no' / 'model'}"], "no such model directory"),
        "unknown model id": (["baseline", "--run-dir", rd, "--set", "model=no-such-org/no-such-model-xyz"], "cannot load it"),
        "openai model string without a model": (["baseline", "--run-dir", rd, "--set", "model=openai:http://localhost:1/v1"], "no model name after '#'"),
        "openai server not reachable": (["baseline", "--run-dir", rd, "--set", "model=openai:http://127.0.0.1:1/v1#m"], "check that the server is up"),
        "option the tokenizer cannot express": (base + ["--set", f"prompts={f['ok_prompts']}", "--set", "split=all", "--set", f"mc={f['empty_option']}"], "empty option"),
        "prompt longer than the context": (base + ["--set", f"prompts={f['long_prompt']}", "--set", "split=all"], "longer than the context"),
        "unwritable run dir": (["baseline", "--run-dir", str(f["bad_yaml"] / "sub"), "--set", f"model={tiny}"], "cannot write"),
        "malformed manifest": (["baseline", "--run-dir", str(f["manifest"]), "--set", f"model={tiny}"], "malformed manifest"),
        "bad dtype": (base + ["--set", "dtype=int3"], "dtype 'int3'"),
    }


def test_error_catalog_in_process(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CAI_OPENAI_MAX_RETRIES", "0")  # the unreachable server fails at once
    cases = catalog(tmp_path, tiny_model_dir)
    assert len(cases) >= 15
    for name, (argv, expected) in cases.items():
        code = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        err = [line for line in err if line.startswith("cai: error:")]
        assert code == 2, f"{name}: exit {code}"
        assert len(err) == 1 and expected in err[0], f"{name}: {err}"
    # nothing a rerun would trust: no stage was marked done
    manifest = tmp_path / "run" / "manifest.json"
    if manifest.exists():
        stages = json.loads(manifest.read_text())["stages"]
        assert all(s["status"] != "done" for s in stages.values())


@pytest.mark.parametrize("name", ["malformed YAML", "unknown flag", "prompt longer than the context"])
def test_error_as_a_subprocess_has_no_traceback(tmp_path, tiny_model_dir, name):
    argv, expected = catalog(tmp_path, tiny_model_dir)[name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "constitutional.cli", *argv], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.startswith("cai: error:")]
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in res.stderr


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ["redteam", "revise", "sft", "sample", "label", "train-pm", "rl", "distill", "eval", "report", "run", "quickstart", "models"]:
        assert f"\n    {name}" in out
