"""builtin:benign_train: benign prompts that only look harmful, for the supervised stage's helpful mix.

They must stay apart from the evaluation's benign look-alikes and from the red-team prompts, or the
over-refusal rate would be measured on prompts the model was trained on.
"""

from __future__ import annotations

import collections
import json
import re

import pytest

from constitutional.constitution import builtin_path
from constitutional.errors import UserError
from constitutional.run import RunDir
from constitutional.stages import load_prompt_sets

N_GRAM = 4
MAX_CONTAINMENT = 0.5


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in builtin_path(name).read_text(encoding="utf-8").splitlines() if line.strip()]


def _grams(text: str) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(w[i : i + N_GRAM]) for i in range(len(w) - N_GRAM + 1)} or {tuple(w)}


def containment(text: str, source: str) -> float:
    """Share of `text`'s word 4-grams (the whole text, when shorter) that occur in `source`."""
    t, s = _grams(text), _grams(source)
    return len(t & s) / len(t)


def test_containment_helper():
    assert containment("how do I kill a Python process", "How do I kill a Python process that hangs?") == 1.0
    assert containment("how do I bake bread", "what is the capital of France") == 0.0
    assert containment("a b c d e", "x b c d e y") == 0.5


def test_benign_train_file_shape():
    rows = _rows("benign_lookalike_train_prompts.jsonl")
    assert len(rows) == 240
    assert all(set(r) == {"id", "category", "split", "prompt"} for r in rows)
    assert [r["id"] for r in rows] == [f"bt-{i:04d}" for i in range(1, 241)]
    assert len({r["prompt"].strip().lower() for r in rows}) == 240
    assert {r["split"] for r in rows} == {"train"}
    red_categories = {r["category"] for r in _rows("redteam_prompts.jsonl")}
    counts = collections.Counter(r["category"] for r in rows)
    assert set(counts) == red_categories and len(counts) == 16 and set(counts.values()) == {15}


def test_benign_train_loads_as_a_train_set(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    prompts = load_prompt_sets("builtin:benign_train", run_dir, split="train")
    assert len(prompts) == 240 and all(p.id.startswith("bt-") and p.split == "train" for p in prompts)
    with pytest.raises(UserError, match="no prompts found in split 'test'"):
        load_prompt_sets("builtin:benign_train", run_dir, split="test")
    mixed = load_prompt_sets("builtin:helpful+builtin:benign_train", run_dir, split="train")
    assert len(mixed) == len(load_prompt_sets("builtin:helpful", run_dir, split="train")) + 240


def test_benign_train_is_disjoint_from_eval_and_redteam():
    train = [r["prompt"] for r in _rows("benign_lookalike_train_prompts.jsonl")]
    others = [r["prompt"] for name in ("benign_lookalike_prompts.jsonl", "redteam_prompts.jsonl") for r in _rows(name)]
    lowered = {o.strip().lower() for o in others}
    assert not [p for p in train if p.strip().lower() in lowered]
    close = [(p, o, round(c, 2)) for p in train for o in others if (c := containment(p, o)) >= MAX_CONTAINMENT]
    assert not close
