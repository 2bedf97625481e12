"""`cai run` / a stage command on the tiny model: records, manifest, skip on rerun, config change."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from constitutional.cli import main
from constitutional.errors import UserError
from constitutional.pipeline import quickstart_config_path
from constitutional.run import read_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_quickstart_config_is_the_packaged_one():
    assert (ROOT / "configs" / "quickstart.yaml").read_text() == quickstart_config_path().read_text()


def _pipeline(tmp_path, tiny, limit=3):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\nseed: 1\nmodel: {tiny}\nstages: [baseline]\n"
        f"baseline:\n  limit: {limit}\n  split: all\n  max_new_tokens: 3\n  mc_limit: 4\n  dtype: float32\n"
    )
    return cfg


def test_run_writes_records_and_skips_when_done(tmp_path, tiny_model_dir, capsys):
    cfg = _pipeline(tmp_path, tiny_model_dir)
    assert main(["run", str(cfg)]) == 0
    run = tmp_path / "run"
    m = json.loads((run / "manifest.json").read_text())
    st = m["stages"]["baseline"]
    assert st["status"] == "done" and st["summary"]["mc_items"] == 4 and st["summary"]["responses"] == 3
    assert m["config"]["baseline"]["model"] == str(tiny_model_dir) and m["seed"] == 1
    assert len(read_jsonl(run / "baseline" / "responses.jsonl")) == 3
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 0
    assert "already done" in capsys.readouterr().err
    # a changed config reruns the stage; the old records are kept aside, not mixed in
    assert main(["run", str(cfg), "--set", "baseline.limit=2"]) == 0
    assert len(read_jsonl(run / "baseline" / "responses.jsonl")) == 2
    assert any(p.name.startswith("baseline.stale-") for p in run.iterdir())


def test_stage_command_resumes_a_partial_shard(tmp_path, tiny_model_dir):
    cfg = _pipeline(tmp_path, tiny_model_dir, limit=4)
    assert main(["baseline", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 0
    shard = tmp_path / "r" / "baseline" / "responses.jsonl"
    lines = shard.read_text().splitlines()
    # simulate a crash after two records, the third torn mid-write, stage left "running"
    shard.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    m["stages"]["baseline"]["status"] = "running"
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(m))
    assert main(["baseline", "--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 0
    ids = [r["id"] for r in read_jsonl(shard)]
    assert sorted(ids) == sorted(json.loads(x)["id"] for x in lines) and len(ids) == len(set(ids)) == 4
    assert ids[:2] == [json.loads(x)["id"] for x in lines[:2]]  # the first two were not redone


def test_every_stage_is_built_and_the_help_names_no_issue(capsys):
    from constitutional import stages

    for info in stages.STAGES:
        module = stages.load(info.name)
        assert callable(module.run) and dataclasses.is_dataclass(module.Config), info.name
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "not built" not in text and "issue" not in text.lower()
    assert all(info.name in text for info in stages.STAGES)


def test_resolve_model_prefers_this_runs_trained_model(tmp_path, tiny_model_dir):
    import shutil

    from constitutional.backends import model_path
    from constitutional.run import RunDir
    from constitutional.stages import resolve_model

    rd = RunDir(tmp_path / "run")
    assert resolve_model("auto", rd) == "embedded"
    assert resolve_model("some/model", rd) == "some/model"
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "sft" / "model")
    assert resolve_model("auto", rd) == str(tmp_path / "run" / "sft" / "model")
    assert resolve_model("auto", rd, prefer=("rl",)) == "embedded"
    rd.manifest["pipeline"] = {"model": "some/base"}
    assert resolve_model("auto", rd, prefer=("rl",)) == "some/base"
    assert model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    with pytest.raises(UserError, match="cannot be fine-tuned"):
        model_path("openai:http://localhost:8000/v1#m")


def test_pipeline_model_is_not_injected_into_auto_models(tmp_path):
    from dataclasses import dataclass

    from constitutional.config import opt
    from constitutional.pipeline import PipelineConfig, stage_config

    @dataclass
    class Config:
        model: str = opt("auto", "x")
        seed: int = opt(0, "x")

    class Module:
        pass

    Module.Config = Config
    import constitutional.stages as st

    orig = st.load
    st.load = lambda name: Module
    try:
        _, cfg = stage_config("sft", {}, PipelineConfig(model="m", seed=3), "test")
        assert cfg.model == "auto" and cfg.seed == 3
        _, cfg = stage_config("sft", {"model": "x"}, PipelineConfig(model="m", seed=3), "test")
        assert cfg.model == "x"
    finally:
        st.load = orig


def test_headline_reports_timings_and_the_numbers_that_matter(tmp_path):
    from constitutional.pipeline import headline
    from constitutional.run import RunDir

    rd = RunDir(tmp_path / "run")
    rd.manifest["stages"] = {
        "label": {"seconds": 10.0, "summary": {"verdict": "labeler position-dominated"}},
        "train-pm": {"seconds": 20.0, "summary": {"mc_accuracy": 0.64, "mc_accuracy_untrained": 0.40, "heldout_accuracy": 0.0, "heldout_comparisons": 2}},
        "rl": {"seconds": 30.0, "summary": {"eval": {"prompts": 32, "win_rate_rl_cai": 0.56, "win_rate_ci95": [0.39, 0.72],
                                                     "pm_score_difference": 0.0015, "pm_score_difference_ci95": [-0.01, 0.01]}}},
        "dpo": {"seconds": 4.0, "summary": {"data": "revisions", "loss": "soft", "steps": 12, "heldout_accuracy_before": 0.5,
                                            "heldout_accuracy_after": 0.75, "heldout_comparisons": 4,
                                            "eval": {"prompts": 8, "win_rate_dpo": 0.6, "win_rate_ci95": [0.3, 0.8], "pm_score_difference": None}}},
        "eval": {"seconds": 5.0, "summary": {}},
        "report": {"seconds": 1.0, "summary": {"report": "runs/x/report/report.html"}},
    }
    (rd.path / "eval").mkdir()
    from constitutional.eval_math import paired_change

    harmful = paired_change([False] * 9 + [True], [True] * 6 + [False] * 3 + [True])
    benign = paired_change([False] * 10, [True] + [False] * 9)
    (rd.path / "eval" / "results.json").write_text(json.dumps({
        "models": ["base", "sl-cai"],
        "refusal": {"base": {"harmful_refusal_rate": 0.1, "n_harmful": 10, "benign_refusal_rate": 0.0, "n_benign": 10},
                    "sl-cai": {"harmful_refusal_rate": 0.7, "n_harmful": 10, "benign_refusal_rate": 0.1, "n_benign": 10,
                               "change": {"harmful": harmful, "benign": benign,
                                          "harmful_engaged": paired_change([True] * 10, [True] * 2 + [False] * 8),
                                          "benign_engaged": paired_change([True] * 10, [True] * 9 + [False]),
                                          "opening": {"opening": "i'm here to", **paired_change([False] * 10, [True] * 6 + [False] * 4)}}}},
        "harmlessness": {"elo": {"base": {"elo": 0.0}, "sl-cai": {"elo": 12.4}}}, "helpfulness": {"elo": {"base": {"elo": 0.0}, "sl-cai": {"elo": -3.0}}},
        "judge": {"model": "embedded", "accuracy": 0.52, "ci": [0.4, 0.63], "n": 72, "at_chance": True},
    }))
    lines = headline(rd, ["label", "train-pm", "rl", "eval", "report"])
    text = "\n".join(lines)
    assert lines[1].startswith("== sl-cai vs base: refuses 10% -> 70% of 10 harmful prompts (+60 points [")  # the verdict comes first
    assert f"p = {harmful['p_value']:.3f}: significant); over-refuses 0% -> 10% of 10 benign look-alikes (+10 points [" in lines[1]
    assert "p = 1.000: not significant); takes up the request in 100% -> 20% of harmful prompts (p = 0.008) and 100% -> 90% " \
           "of benign ones (p = 1.000; engagement check 84% [76%, 90%] accurate on hand labels); opens 60%" in lines[1]
    assert "; opens 60% of its 10 answers with \"i'm here to...\" (base 0%, p = 0.031); harmlessness" in lines[1]
    assert "harmlessness Elo +12, helpfulness Elo -3 (judge at chance (52% [40%, 63%] on 72 labelled comparisons, both orders): " \
           "an Elo from it is no evidence either way)" in lines[1]
    assert "label 10, train-pm 20, rl 30, eval 5, report 1; total 66 s" in text
    assert "labeler position-dominated" in text and "0.64 (untrained head 0.40)" in text
    assert "held-out agreement with the labels 0.00 (2 comparisons)" in text  # 0.0 is a number, not "missing"
    assert "win rate 0.56 [0.39, 0.72]" in text
    assert "DPO (revisions, soft loss, 12 steps): held-out log π(chosen) > log π(rejected) 0.50 -> 0.75 (4 comparisons); " \
           "vs SL-CAI on 8 held-out prompts: win rate 0.60 [0.30, 0.80]" in text and "PM score change" not in text.split("DPO")[1]
    assert "report: runs/x/report/report.html" in text

    from constitutional.pipeline import _opening, verdict_lines

    assert _opening({"opening": "when someone is", **paired_change([False] * 12, [True] + [False] * 11)}, "base") == ""  # 1 of 12: no stock opening

    alone = verdict_lines({"models": ["base"], "refusal": {"base": {"harmful_refusal_rate": 0.1, "n_harmful": 10, "benign_refusal_rate": 0.0, "n_benign": 10}}})
    assert alone == ["== base: refuses 10% of 10 harmful prompts, 0% of 10 benign look-alikes (no trained model to compare)"]


def test_every_shipped_config_builds(tmp_path):
    """Each config in configs/ parses and every stage section (listed in stages or not) builds its typed config."""
    from constitutional.config import load_yaml
    from constitutional.pipeline import split_pipeline, stage_config

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"quickstart.yaml", "cpu_small.yaml", "distill_cpu.yaml", "paper.yaml"}
    for path in configs:
        assert path.read_text().startswith("# cai "), f"{path.name} must start with the command that runs it"
        pipe, sections = split_pipeline(load_yaml(path), str(path))
        for name in dict.fromkeys([*pipe.stages, *sections]):
            stage_config(name, sections.get(name, {}), pipe, str(path))


def _two_stages(tmp_path, tiny, fresh: bool, prompts: str = "builtin:redteam"):
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel: {tiny}\nfresh_process: {str(fresh).lower()}\nstages: [baseline, sample]\n"
        f"baseline:\n  prompts: {prompts}\n  limit: 2\n  split: all\n  max_new_tokens: 3\n  mc_limit: 2\n  dtype: float32\n"
        f"sample:\n  policy: {tiny}\n  limit: 2\n  max_new_tokens: 3\n  dtype: float32\n"
    )
    return cfg


@pytest.mark.parametrize("fresh", [True, False])
def test_each_stage_runs_in_a_process_of_its_own_unless_told_not_to(tmp_path, tiny_model_dir, fresh):
    import os

    assert main(["run", str(_two_stages(tmp_path, tiny_model_dir, fresh))]) == 0
    st = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert st["baseline"]["status"] == st["sample"]["status"] == "done"
    assert st["baseline"]["summary"]["responses"] == 2 and st["sample"]["summary"]["prompts"] == 2
    assert len(read_jsonl(tmp_path / "run" / "sample" / "pairs.jsonl")) == 2
    pids = {st["baseline"]["pid"], st["sample"]["pid"]}
    assert pids.isdisjoint({os.getpid()}) and len(pids) == 2 if fresh else pids == {os.getpid()}


def test_bad_input_found_in_a_stage_process_is_one_line_and_exit_2(tmp_path, tiny_model_dir, capsys):
    cfg = _two_stages(tmp_path, tiny_model_dir, True, prompts=str(tmp_path / "missing.jsonl"))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cai: error: ") and "missing.jsonl" in err[-1] and "Traceback" not in "".join(err)
    st = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert st["baseline"]["status"] == "failed" and "sample" not in st  # the pipeline stopped there
