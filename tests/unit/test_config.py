"""Typed config from YAML with --set overrides."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from constitutional.config import build, config_hash, load_yaml, merge, opt, parse_overrides
from constitutional.errors import UserError


@dataclass
class Cfg:
    rounds: int = opt(4, "revision rounds")
    lr: float = opt(1e-5, "learning rate")
    name: str = opt("x", "a name")
    flag: bool = opt(False, "a switch")
    stages: list[str] = opt([], "stage names")
    limit: int | None = opt(None, "optional limit")


def test_build_coerces_and_checks():
    c = build(Cfg, {"rounds": "2", "lr": 3, "flag": "true", "stages": "a,b", "limit": None}, "f.yaml")
    assert (c.rounds, c.lr, c.flag, c.stages, c.limit) == (2, 3.0, True, ["a", "b"], None)
    with pytest.raises(UserError, match=r"f.yaml: unknown setting 'round'"):
        build(Cfg, {"round": 1}, "f.yaml")
    with pytest.raises(UserError, match=r"rounds: expected an integer"):
        build(Cfg, {"rounds": "two"}, "f.yaml")
    with pytest.raises(UserError, match=r"flag: expected true or false"):
        build(Cfg, {"flag": "maybe"}, "f.yaml")
    with pytest.raises(UserError, match="expected a mapping"):
        build(Cfg, [1, 2], "f.yaml")


def test_defaults_are_not_shared():
    a, b = Cfg(), Cfg()
    a.stages.append("x")
    assert b.stages == []


def test_overrides_nest_and_parse_scalars():
    over = parse_overrides(["revise.rounds=2", "seed=3", "model=embedded", "revise.name=a=b"])
    assert over == {"revise": {"rounds": 2, "name": "a=b"}, "seed": 3, "model": "embedded"}
    assert merge({"revise": {"rounds": 4, "lr": 1}}, over)["revise"] == {"rounds": 2, "lr": 1, "name": "a=b"}
    with pytest.raises(UserError, match="expected key=value"):
        parse_overrides(["rounds"])


def test_config_hash_changes_with_values():
    assert config_hash(Cfg()) == config_hash(Cfg())
    assert config_hash(Cfg()) != config_hash(Cfg(rounds=5))


def test_load_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: malformed YAML"):
        load_yaml(bad)
