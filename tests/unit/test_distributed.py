"""The run-directory side of several training processes (distributed.py, pipeline.run_stage_ranks),
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
