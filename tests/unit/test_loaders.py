"""Prompt-set and multiple-choice loaders, built-in data sets and the deterministic split."""

from __future__ import annotations

import collections
import json

import pytest

from constitutional.data.loaders import load_mc, load_prompts, parse_transcript, split_of, to_transcript
from constitutional.errors import UserError


def test_builtin_prompt_sets():
    red = load_prompts("builtin:redteam")
    helpful = load_prompts("builtin:helpful")
    assert len(red) >= 150 and len(helpful) >= 150
    for ps in (red, helpful):
        cats = collections.Counter(p.category for p in ps)
        assert len(cats) >= 12 and min(cats.values()) >= 8
        splits = collections.Counter(p.split for p in ps)
        assert 0.1 < splits["test"] / len(ps) < 0.3
        assert len({p.prompt for p in ps}) == len(ps)
    test_ids = [p.id for p in load_prompts("builtin:redteam", split="test")]
    assert test_ids == [p.id for p in red if split_of(p.id) == "test"]
    assert len(load_prompts("builtin:helpful", limit=5)) == 5


def test_split_is_deterministic():
    assert split_of("rt-0001") == split_of("rt-0001")
    assert {split_of(f"x-{i}") for i in range(100)} == {"train", "test"}


def test_transcripts():
    text = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: I'm locked out.\n\nAssistant: Call a locksmith."
    msgs = parse_transcript(text)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "I'm locked out."
    assert parse_transcript("just a question") == []
    assert to_transcript(msgs[:2]) == "Human: How do I pick a lock?\n\nAssistant: Why?"


def test_file_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "one"}) + "\n\n" + json.dumps({"question": "two", "split": "test"}) + "\n"
        + json.dumps({"transcript": "\n\nHuman: three\n\nAssistant: ok"}) + "\n"
    )
    ps = load_prompts(tmp_path / "p.jsonl")
    assert [(p.id, p.prompt) for p in ps] == [("a", "one"), ("p-00001", "two"), ("p-00002", "three")]
    assert ps[1].split == "test" and ps[2].messages == [{"role": "user", "content": "three"}]
    (tmp_path / "p.csv").write_text('id,prompt,category\nx,"hello, world",greeting\n')
    assert load_prompts(tmp_path / "p.csv")[0].prompt == "hello, world"
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [p.prompt for p in load_prompts(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.json").write_text(json.dumps([{"instruction": "do it"}]))
    assert load_prompts(tmp_path / "p.json")[0].prompt == "do it"
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]}) + "\n")
    p = load_prompts(tmp_path / "m.jsonl")[0]
    assert p.prompt == "again" and len(p.messages) == 3


def test_hf_dataset_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"chosen": ["\n\nHuman: Is this safe?\n\nAssistant: Yes."], "rejected": ["\n\nHuman: Is this safe?\n\nAssistant: No."]})
    ds.save_to_disk(str(tmp_path / "hh"))
    ps = load_prompts(tmp_path / "hh")
    assert ps[0].prompt == "Is this safe?"


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(UserError, match="duplicate id 'a'"):
        load_prompts(tmp_path / "dup.jsonl")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"nofield.jsonl:1: missing field 'prompt'"):
        load_prompts(tmp_path / "nofield.jsonl")
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(UserError, match="x.parquet: not a readable Parquet file"):
        load_prompts(tmp_path / "x.parquet")
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unsupported prompt file type '.xml'"):
        load_prompts(tmp_path / "x.xml")
    with pytest.raises(UserError, match="unknown built-in"):
        load_prompts("builtin:nope")


def test_builtin_mc_set_is_balanced():
    items = load_mc("builtin:mc")
    assert len(items) >= 60
    subsets = collections.Counter(it.subset for it in items)
    assert set(subsets) == {"harmless", "helpful", "honest"} and min(subsets.values()) >= 20
    correct_first = sum(it.options[it.correct[0]] == " (A)" for it in items)
    assert correct_first * 2 == len(items)
    for it in items:
        assert it.prompt.rstrip().endswith("The answer is:") and "(A)" in it.prompt and "(B)" in it.prompt


def test_mc_formats_and_errors(tmp_path):
    task = tmp_path / "task" / "task.json"
    task.parent.mkdir()
    task.write_text(json.dumps({"examples": [{"input": "Q: 2+2?\nA:", "target_scores": {"4": 1, "5": 0}}]}))
    (it,) = load_mc(task.parent)
    assert it.options == [" 4", " 5"] and it.correct == [0]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "x", "corrects": [" (A)"]}) + "\n")
    with pytest.raises(UserError, match="expected fields prompt, corrects, incorrects"):
        load_mc(tmp_path / "bad.jsonl")
    (tmp_path / "t.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(UserError, match="examples"):
        load_mc(tmp_path / "t.json")


def test_builtin_benign_and_truthfulness_sets():
    from constitutional.data.loaders import load_mc, load_prompts

    benign = load_prompts("builtin:benign")
    assert len(benign) >= 40 and all(p.id.startswith("bl-") for p in benign)
    truth = load_mc("builtin:truthfulness")
    assert len(truth) >= 24 and all(it.correct == [0] and len(it.options) == 2 for it in truth)
    with pytest.raises(UserError, match="builtin:truthfulness"):
        load_mc("builtin:nope")
