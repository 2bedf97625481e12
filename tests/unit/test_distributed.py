"""The run-directory side of several training processes (distributed.py, pipeline.run_stage),
without starting processes: ranks from the environment, and what refuses to run under a launcher.
The real 2-process runs are tests/integration/test_multiprocess_training.py."""

import pytest

from constitutional import distributed
from constitutional.cli import main


def test_single_process_defaults(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    distributed.barrier()  # a no-op
    with distributed.main_first() as main_:
        assert main_


def test_ranks_from_the_launcher_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert distributed.world_size() == 4 and distributed.rank() == 3 and not distributed.is_main()
    monkeypatch.setenv("WORLD_SIZE", "garbage")
    assert distributed.world_size() == 1


@pytest.mark.parametrize("argv, expected", [
    (["revise"], "runs in one process"),
    (["label"], "runs in one process"),
    (["quickstart"], "a pipeline runs in one process"),
])
def test_generation_stages_and_pipelines_refuse_several_processes(argv, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(argv + ["--run-dir", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cai: error:")]
    assert len(err) == 1 and expected in err[0]


def test_only_the_main_process_prints_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["revise", "--run-dir", str(tmp_path / "run")]) == 2
    assert "cai: error:" not in capsys.readouterr().err


@pytest.mark.parametrize("name, kind", [("cpu_2proc", "MULTI_GPU"), ("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_load(name, kind):
    """configs/accelerate/*.yaml parse with accelerate's own loader; the sharded ones save a full model."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    path = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / f"{name}.yaml"
    assert path.read_text().startswith("# cai accelerate config:")
    cfg = load_config_from_file(str(path))
    assert cfg.distributed_type.name == kind and cfg.num_processes >= 2 and cfg.mixed_precision == "no"
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == 3 and cfg.deepspeed_config["zero3_save_16bit_model"]
