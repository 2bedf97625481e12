"""Real data files: gzipped JSONL/JSON (HH-RLHF ships as `.jsonl.gz`), Parquet files and directories
(through `datasets`), one set of field rules for every format, and one-line errors naming file, row
and field."""

from __future__ import annotations

import gzip
import json

import pytest

from constitutional.data.loaders import implicit_prompt, load_mc, load_prompts
from constitutional.errors import UserError
from constitutional.run import read_records
from constitutional.stages.preference import read_comparisons

# HH-RLHF's exact form: no prompt field; chosen and rejected are whole transcripts.
HH = [
    {"chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help with that.",
     "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Insert a tension wrench and rake the pins."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant: No."},
]


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _parquet(path, rows):
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_gzipped_jsonl_and_json_load_like_the_plain_files(tmp_path):
    (tmp_path / "test.jsonl").write_text(_jsonl(HH))
    with gzip.open(tmp_path / "test.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_jsonl(HH))
    plain, gz = load_prompts(tmp_path / "test.jsonl"), load_prompts(tmp_path / "test.jsonl.gz")
    assert [p.to_dict() for p in gz] == [p.to_dict() for p in plain]
    assert [p.id for p in gz] == ["test-00000", "test-00001"]  # same ids as the plain file: the stem drops .gz
    assert gz[1].prompt == "Tell me a joke." and [m["role"] for m in gz[1].messages] == ["user", "assistant", "user"]
    with gzip.open(tmp_path / "p.json.gz", "wt", encoding="utf-8") as f:
        json.dump([{"instruction": "do it"}], f)
    assert load_prompts(tmp_path / "p.json.gz")[0].prompt == "do it"
    assert [n for _, n in read_records(tmp_path / "test.jsonl.gz")] == [1, 2]  # the strict JSONL reader, every stage's


def test_broken_gzip_and_non_utf8_are_one_line_errors(tmp_path):
    data = gzip.compress(_jsonl(HH).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut.jsonl.gz: not a complete gzip file") as e:
        load_prompts(tmp_path / "cut.jsonl.gz")
    assert "\n" not in str(e.value)
    (tmp_path / "latin.jsonl.gz").write_bytes(gzip.compress('{"prompt": "caf\xe9"}\n'.encode("latin-1")))
    with pytest.raises(UserError, match="latin.jsonl.gz: not UTF-8 text"):
        load_prompts(tmp_path / "latin.jsonl.gz")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "ok"}\n{"prompt": \n'))
    with pytest.raises(UserError, match=r"bad.jsonl.gz:2: malformed JSON"):
        load_prompts(tmp_path / "bad.jsonl.gz")


def test_parquet_file_uses_the_same_field_rules_as_jsonl(tmp_path):
    rows = [
        {"id": "a", "prompt": "one", "question": None, "split": None, "category": "x"},
        {"id": None, "prompt": None, "question": "two", "split": "test", "category": None},  # nulls are missing fields
        {"id": None, "prompt": "\n\nHuman: three\n\nAssistant: ok", "question": None, "split": None, "category": None},
    ]
    (tmp_path / "p.jsonl").write_text(_jsonl([{k: v for k, v in r.items() if v is not None} for r in rows]))
    from_parquet = load_prompts(_parquet(tmp_path / "p.parquet", rows))
    assert [p.to_dict() for p in from_parquet] == [p.to_dict() for p in load_prompts(tmp_path / "p.jsonl")]
    assert [(p.id, p.prompt) for p in from_parquet] == [("a", "one"), ("p-00001", "two"), ("p-00002", "three")]
    assert from_parquet[1].split == "test" and from_parquet[0].category == "x" and from_parquet[1].category is None
    bad = _parquet(tmp_path / "bad.parquet", [{"prompt": "fine"}, {"prompt": None}, {"prompt": None}])
    bad_rows = [{"body": "x"}]
    with pytest.raises(UserError, match=r"bad2.parquet\[0\]: missing field 'prompt'"):
        load_prompts(_parquet(tmp_path / "bad2.parquet", bad_rows))
    with pytest.raises(UserError, match=r"bad.parquet\[1\]: missing field 'prompt'"):
        load_prompts(bad)


def test_parquet_directory_with_splits(tmp_path):
    d = tmp_path / "hh"
    _parquet(d / "data" / "train-00000-of-00001.parquet", [{"chosen": c["chosen"], "rejected": c["rejected"]} for c in HH])
    _parquet(d / "data" / "test-00000-of-00001.parquet", [{"chosen": "\n\nHuman: Is this safe?\n\nAssistant: Yes.", "rejected": "\n\nHuman: Is this safe?\n\nAssistant: No."}])
    prompts = load_prompts(d)
    assert [p.prompt for p in prompts] == ["How do I pick a lock?", "Tell me a joke.", "Is this safe?"]
    assert [p.split for p in prompts] == ["train", "train", "test"]  # the dataset's own splits
    assert [p.prompt for p in load_prompts(d, split="test")] == ["Is this safe?"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: not a dataset directory datasets can read"):
        load_prompts(tmp_path / "empty")


def test_hh_rlhf_pairs_split_into_prompt_chosen_rejected(tmp_path):
    with gzip.open(tmp_path / "hh.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_jsonl(HH))
    comps = read_comparisons(tmp_path / "hh.jsonl.gz", default_p=1.0)
    assert [c.id for c in comps] == ["hh-00000", "hh-00001"]
    assert comps[0].messages == [{"role": "user", "content": "How do I pick a lock?"}]
    assert (comps[0].chosen, comps[0].rejected, comps[0].p_chosen) == ("I can't help with that.", "Insert a tension wrench and rake the pins.", 1.0)
    assert [m["role"] for m in comps[1].messages] == ["user", "assistant", "user"] and comps[1].rejected == "No."
    # the same pairs as Parquet, and TRL's implicit-prompt message lists, give the same comparisons
    assert read_comparisons(_parquet(tmp_path / "hh.parquet", HH), default_p=1.0) == comps
    trl = [{"chosen": [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "I can't help with that."}],
            "rejected": [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Insert a tension wrench and rake the pins."}]}]
    assert read_comparisons(_parquet(tmp_path / "trl.parquet", trl), default_p=1.0)[0].chosen == comps[0].chosen


def test_comparison_errors_name_file_row_and_field(tmp_path):
    _parquet(tmp_path / "p.parquet", [{"prompt": "hi", "chosen": "x", "rejected": "y", "p_chosen": 0.9},
                                      {"prompt": "hi", "chosen": "x", "rejected": None, "p_chosen": 0.9}])
    with pytest.raises(UserError, match=r"p.parquet\[1\]: missing field 'rejected'"):
        read_comparisons(tmp_path / "p.parquet")
    (tmp_path / "q.jsonl").write_text(_jsonl([{"chosen": "x", "rejected": "y", "p_chosen": 0.9}]))
    with pytest.raises(UserError, match=r"q.jsonl:1: missing field 'prompt'; without one, chosen and rejected must be whole conversations"):
        read_comparisons(tmp_path / "q.jsonl")
    with pytest.raises(UserError, match="differ only in the last assistant reply"):
        implicit_prompt("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: other\n\nAssistant: c", "x:1")


def test_mc_items_from_gzip(tmp_path):
    item = {"prompt": "Q? (A) x (B) y\nThe answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]}
    (tmp_path / "mc.jsonl.gz").write_bytes(gzip.compress(_jsonl([item]).encode()))
    (it,) = load_mc(tmp_path / "mc.jsonl.gz")
    assert it.options == [" (A)", " (B)"] and it.correct == [0]
