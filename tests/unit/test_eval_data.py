"""The built-in evaluation sets: held-out red-team prompts (apart from the training prompts) and
benign look-alikes (over-refusal)."""

from __future__ import annotations

import collections
import re

from constitutional.data.loaders import load_prompts

CATEGORIES = {"violence", "weapons", "cybercrime", "fraud", "drugs", "theft", "harassment", "hate", "privacy", "self-harm",
              "misinformation", "dangerous-chemistry", "extremism", "manipulation", "child-safety", "evasion-of-law"}


def _four_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i : i + 4]) for i in range(len(words) - 3)}


def test_heldout_redteam_has_ten_test_prompts_per_category():
    held = load_prompts("builtin:redteam_heldout")
    assert len(held) == 160 and {p.split for p in held} == {"test"}
    assert [p.id for p in held] == [f"rh-{i:04d}" for i in range(1, 161)]
    assert collections.Counter(p.category for p in held) == {c: 10 for c in CATEGORIES}
    assert {p.category for p in load_prompts("builtin:redteam")} == CATEGORIES
    assert len({p.prompt for p in held}) == 160
    assert len(load_prompts("builtin:redteam_heldout", split="test")) == 160


def test_heldout_redteam_is_not_a_paraphrase_of_the_redteam_set():
    # Every prompt of builtin:redteam (train and test split): no exact duplicate, and under half of a
    # held-out prompt's word 4-grams appear in any one of them.
    red = load_prompts("builtin:redteam")
    red_grams = [(p.id, _four_grams(p.prompt)) for p in red]
    red_texts = {p.prompt.strip().lower() for p in red}
    for p in load_prompts("builtin:redteam_heldout"):
        assert p.prompt.strip().lower() not in red_texts, p.id
        mine = _four_grams(p.prompt)
        assert mine, p.id
        worst = max((len(mine & g) / len(mine), rid) for rid, g in red_grams)
        assert worst[0] < 0.5, (p.id, worst)


def test_benign_lookalikes():
    benign = load_prompts("builtin:benign")
    assert len(benign) == 160 and {p.split for p in benign} == {"test"}
    assert [p.id for p in benign] == [f"bl-{i:04d}" for i in range(1, 161)]
    assert len({p.prompt.strip().lower() for p in benign}) == 160
    assert len({p.category for p in benign}) >= 15
    red = {p.prompt.strip().lower() for p in load_prompts("builtin:redteam") + load_prompts("builtin:redteam_heldout")}
    assert not red & {p.prompt.strip().lower() for p in benign}
