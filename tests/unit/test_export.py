"""`cai export`: a run's records as Hugging Face datasets (save_to_disk + Parquet + cards), reloaded
with `datasets`, consumed as is by TRL's SFTTrainer and DPOTrainer, and the hub push's one-line
failures when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from constitutional.errors import UserError
from constitutional.export import export
from constitutional.run import RunDir

CAI = [sys.executable, "-m", "constitutional.cli"]


def write_label(run: RunDir, n: int = 6) -> list[dict]:
    d = run.path / "label"
    d.mkdir(parents=True, exist_ok=True)
    recs = [{"id": f"pair{i}", "prompt": f"How do I pick lock {i}?", "messages": [{"role": "user", "content": f"How do I pick lock {i}?"}],
             "chosen": "I can't help with that.", "rejected": f"Use a tension wrench ({i}).", "p_chosen": 0.5 + i / 20, "p_response0": 0.6,
             "hard_label": "A", "tie": False, "principle_ids": ["harmless-0"], "orders": [], "feedback_model": "embedded",
             "split": "test" if i == 0 else "train", "category": "crime"} for i in range(n)]
    (d / "preferences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


@pytest.fixture
def run(tmp_path):
    from test_sft import write_revise

    run = RunDir(tmp_path / "run")
    write_revise(run)
    write_label(run)
    run.manifest["config"] = {"revise": {"model": "embedded", "constitution": "default", "rounds": 3},
                              "label": {"feedback_model": "embedded", "constitution": "default", "principles": 1}}
    run.save()
    return run


def test_export_writes_datasets_parquet_and_cards(run, tmp_path):
    import datasets

    counts = export(run, tmp_path / "out")
    # sft is built from revise/ when `cai sft` has not run: 4 usable revisions + 4 helpful answers (ratio 1)
    assert counts == {"sft": 8, "preferences": 6, "revisions": 6}
    out = tmp_path / "out"
    for name, n in counts.items():
        disk = datasets.load_from_disk(str(out / name))
        parquet = datasets.Dataset.from_parquet(str(out / name / "train.parquet"))
        assert len(disk) == n and disk.to_list() == parquet.to_list()
    sft = datasets.load_from_disk(str(out / "sft"))
    assert sft.column_names == ["id", "source", "messages"]
    assert sft[0]["messages"] == [{"role": "user", "content": "How do I pick lock number 2?"},
                                  {"role": "assistant", "content": "Revision 2 of answer 2: I can't help with that."}]
    prefs = datasets.load_from_disk(str(out / "preferences"))
    assert prefs[1]["prompt"] == [{"role": "user", "content": "How do I pick lock 1?"}]
    assert prefs[1]["chosen"] == [{"role": "assistant", "content": "I can't help with that."}] and prefs[1]["p_chosen"] == pytest.approx(0.55)
    revisions = datasets.load_from_disk(str(out / "revisions"))
    source = [json.loads(line) for line in (run.path / "revise" / "revisions.jsonl").read_text().splitlines()]
    assert revisions.to_list() == source  # every field of every round, as the revise stage wrote it
    card = (out / "revisions" / "README.md").read_text()
    assert "`general-harm`: critique:" in card and "| rounds | 3 |" in card and "(built-in)" in card
    assert "`embedded`" in (pcard := (out / "preferences" / "README.md").read_text()) and "`less-harmful`: " in pcard
    hub = (out / "README.md").read_text()
    assert "- config_name: sft\n  data_files: sft/train.parquet" in hub
    assert json.loads((out / "export.json").read_text())["rows"] == counts


def test_sft_export_is_what_sft_trained_on_and_reexport_replaces(run, tmp_path):
    rows = [{"id": "r1", "source": "revision", "prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}]
    (run.path / "sft").mkdir()
    (run.path / "sft" / "dataset.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert export(run, tmp_path / "out")["sft"] == 1
    assert "the examples `cai sft` trained on" in (tmp_path / "out" / "sft" / "README.md").read_text()
    (run.path / "sft" / "dataset.jsonl").unlink()
    assert export(run, tmp_path / "out")["sft"] == 8  # an earlier export is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not an earlier export"):
        export(run, tmp_path / "mine")
    with pytest.raises(UserError, match="no records to export"):
        export(RunDir(tmp_path / "empty"), tmp_path / "out2")


def test_trl_trainers_consume_the_export_as_is(run, tmp_path, tiny_model_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    export(run, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no", max_length=64)
    sft = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), processing_class=tok,
                     args=SFTConfig(output_dir=str(tmp_path / "sft"), **common), train_dataset=datasets.load_from_disk(str(tmp_path / "out" / "sft")))
    assert sft.train().global_step == 1
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), processing_class=tok,
                     args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common), train_dataset=datasets.load_from_disk(str(tmp_path / "out" / "preferences")))
    result = dpo.train()
    assert dpo.state.global_step == 1 and result.training_loss > 0


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1"}, "--push-to-hub someone/cai-run: HF_HUB_OFFLINE is set"),
    ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test"},
     "--push-to-hub someone/cai-run: cannot reach the hub at http://127.0.0.1:9"),
])
def test_push_to_hub_without_a_hub_is_one_line(run, tmp_path, env, message):
    res = subprocess.run(CAI + ["export", "--run-dir", str(run.path), "--to", str(tmp_path / "out"), "--push-to-hub", "someone/cai-run"],
                         capture_output=True, text=True, env={**os.environ, **env})
    errors = [line for line in res.stderr.splitlines() if line.startswith("cai: error:")]  # besides datasets' progress bars
    assert res.returncode == 2 and len(errors) == 1 and res.stderr.strip().endswith(errors[0]), res.stderr[-2000:]
    assert message in errors[0] and f"the export is in {tmp_path / 'out'}" in errors[0]
    assert "preferences: 6 rows" in res.stdout and (tmp_path / "out" / "preferences" / "train.parquet").is_file()
