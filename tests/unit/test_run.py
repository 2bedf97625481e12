"""Run directory: atomic writes, resumable record shards, stage status and skipping."""

from __future__ import annotations

import json

import pytest

from constitutional.errors import UserError
from constitutional.run import RecordShard, RunDir, atomic_write_json, read_jsonl


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_shard_resumes_after_a_torn_write(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordShard(path) as s:
        s.append({"id": "a", "v": 1})
        s.append({"id": "b", "v": 2})
        s.append({"id": "a", "v": 99})  # duplicate id: ignored
    with open(path, "a") as f:  # a kill -9 in the middle of writing record c
        f.write('{"id": "c", "v"')
    with RecordShard(path) as s:
        assert s.done == {"a", "b"}
        assert [x["id"] for x in s.todo([{"id": i} for i in "abcd"])] == ["c", "d"]
        s.append({"id": "c", "v": 3})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    assert path.read_text().count("\n") == 3


def test_corrupt_middle_line_is_a_user_error(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UserError, match=r"r.jsonl:2"):
        read_jsonl(path)


def test_stage_lifecycle(tmp_path):
    rd = RunDir(tmp_path / "run")
    assert rd.begin("revise", {"k": 1}, "h1", seed=3)
    (rd.stage_dir("revise") / "records.jsonl").write_text('{"id": "x"}\n')
    rd.finish("revise", {"n": 1})
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    st = m["stages"]["revise"]
    assert st["status"] == "done" and st["summary"] == {"n": 1} and st["seconds"] >= 0
    assert m["seed"] == 3 and m["config"]["revise"] == {"k": 1} and "torch" in m["versions"]
    rd = RunDir(tmp_path / "run")  # reopened from disk
    assert not rd.begin("revise", {"k": 1}, "h1", seed=3)  # same config: skipped
    assert rd.begin("revise", {"k": 2}, "h2", seed=3)  # changed config: rerun, old folder kept aside
    stale = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("revise.stale-")]
    assert len(stale) == 1
    assert not (rd.stage_dir("revise") / "records.jsonl").exists()
    rd.fail("revise", "boom")
    assert rd.stage_status("revise")["status"] == "failed"


def test_interrupted_stage_with_same_config_resumes_in_place(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.begin("revise", {"k": 1}, "h1", seed=0)
    (rd.stage_dir("revise") / "records.jsonl").write_text('{"id": "x"}\n')
    rd = RunDir(tmp_path / "run")  # the process died: status stays "running"
    assert rd.begin("revise", {"k": 1}, "h1", seed=0)
    assert (rd.stage_dir("revise") / "records.jsonl").exists()


def test_force_moves_the_finished_stage_aside(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.begin("sft", {}, "h", seed=0)
    rd.finish("sft")
    assert rd.begin("sft", {}, "h", seed=0, force=True)
    assert any(p.name.startswith("sft.stale-") for p in (tmp_path / "run").iterdir())


def test_lock_excludes_a_second_writer(tmp_path):
    rd = RunDir(tmp_path / "run")
    with rd.locked():
        with pytest.raises(UserError, match="in use"):
            with RunDir(tmp_path / "run").locked():
                pass
    with RunDir(tmp_path / "run").locked():
        pass


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write"):
        RunDir(blocker / "run")


def test_malformed_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(UserError, match="malformed manifest"):
        RunDir(tmp_path)
