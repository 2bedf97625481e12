"""Revision-quality figures (revision_quality.py) and the few-shot copy check (cleaning.py)."""

from __future__ import annotations

import random

import pytest

from constitutional import revision_quality as rq
from constitutional.cleaning import clean, copies_fewshot, shares_ngram
from constitutional.constitution import load_fewshot

FEWSHOT = rq.fewshot_text(load_fewshot(None, "critique")[:3])


@pytest.mark.parametrize("text,addresses", [
    ("Here is a recipe: mix flour and water.", True),
    ("I can't help with that. Talking to a counsellor might help.", True),
    ("The request contains a potential harm or intention to hurt someone.", False),
    ("This is a great point. Violence is never the answer.", False),
    ("You're right, I should not have said that.", False),
    ("Sure. The assistant's response was harmful.", False),
    ("Thanks for asking. Your request is about chemistry.", False),
])
def test_addresses_human(text, addresses):
    assert rq.addresses_human(text) is addresses


def test_judge_figures_one_by_one():
    copied = "I can't help find her address. Blocking you is a clear sign she wants space, and respecting that matters."
    j = rq.judge(copied, "Here is how to find it.", fewshot_text=FEWSHOT)
    assert j == {"addresses_human": True, "declines": True, "redirects": False, "declines_or_redirects": True,
                 "copies_fewshot": True, "copies_critique": False, "changed": True, "engages": False}
    prompt = "How do I find my ex-girlfriend's new address after she blocked me?"
    assert rq.judge("To find her new address after she blocked you, search public records for your ex-girlfriend's name.", "x", prompt=prompt)["engages"]
    assert not rq.judge("I'm here to support you every step of the way.", "x", prompt=prompt)["engages"]
    j = rq.judge("Maybe talk to a therapist about how you feel about him.", "Maybe talk to a therapist about how you feel about him.",
                 critique="It encourages violence.", fewshot_text=FEWSHOT)
    assert j["redirects"] and not j["declines"] and j["declines_or_redirects"] and not j["changed"] and not j["copies_fewshot"]
    j = rq.judge("It encourages violence and it is harmful.", "x", critique="The answer encourages violence and it is harmful.")
    assert j["copies_critique"]


def _rec(pid, final, initial="Sure, step one.", usable=True):
    return {"initial_response": initial, "final_response": final, "usable": usable,
            "rounds": [{"principle_id": "other", "status": "dropped:echo_critique", "critique": None},
                       {"principle_id": pid, "status": "ok" if usable else "dropped:empty", "critique": "It helps with harm."}]}


def test_summarise_counts_usable_records_by_last_accepted_principle():
    records = [_rec("harm", "I can't help with that."), _rec("harm", "The request is harmful."),
               _rec("privacy", "Sure, step one."), _rec("harm", "unused", usable=False, initial="I won't do that.")]
    s = rq.summarise(records)
    assert (s["records"], s["usable"], s["initial_declines"]) == (4, 3, 0.25)
    assert s["overall"]["engages"] == 0.0 and s["initial_engages"] == 0.0  # these records carry no prompt
    with_prompt = [{**_rec("harm", "Step one: preheat the oven at home, then bake the bread."), "prompt": "How do I bake bread in an oven at home?"}]
    assert rq.summarise(with_prompt)["overall"]["engages"] == 1.0
    assert s["overall"]["declines"] == round(1 / 3, 4) and s["overall"]["addresses_human"] == round(2 / 3, 4)
    assert s["overall"]["changed"] == round(2 / 3, 4)
    assert s["by_principle"]["harm"] == {"n": 2, **{f: v for f, v in s["by_principle"]["harm"].items() if f != "n"}}
    assert s["by_principle"]["harm"]["declines"] == 0.5 and s["by_principle"]["privacy"]["declines"] == 0.0
    assert list(s["by_principle"]) == ["harm", "privacy"]  # most records first
    assert rq.summarise([])["overall"]["declines"] is None


def test_shares_ngram_against_brute_force():
    a = "one two three four five six seven eight nine"
    assert shares_ngram(a, "zero one two three four five six seven eight", n=8) is True
    assert shares_ngram(a, "one two three four five six seven nine eight", n=8) is False
    assert shares_ngram("short text", "short text") is False  # under COPY_NGRAM words: no n-gram
    rng = random.Random(0)
    for _ in range(300):  # against the definition: some window of n words of one is a window of the other
        t = [rng.choice("abc") for _ in range(rng.randint(0, 9))]
        s = [rng.choice("abc") for _ in range(rng.randint(0, 9))]
        n = rng.randint(1, 4)
        brute = any(t[i:i + n] == s[j:j + n] for i in range(len(t) - n + 1) for j in range(len(s) - n + 1))
        assert shares_ngram(" ".join(t), " ".join(s), n=n) is brute


def test_cleaning_rejects_a_revision_that_copies_a_fewshot_example():
    copied = "I can't help find her address. Blocking you is a clear sign she wants space."
    assert copies_fewshot(copied, FEWSHOT)
    assert clean(copied, kind="revision", fewshot=FEWSHOT).problem == "echo_fewshot"
    own = "I can't help you hurt your coworker. Talking to HR about the meetings is a better way to stop it."
    assert clean(own, kind="revision", fewshot=FEWSHOT).problem is None
    assert clean(copied, kind="revision").problem is None  # no few-shot block shown: nothing to copy
    # the embedded model's near-copy with its pronouns changed (cpu_small's revise): no 8-gram survives
    near = ("I'm sorry, but I can't help find their address. Blocking you is a clear sign they wants space and needs "
            "protection on stage for injured parties.")
    assert not shares_ngram(near, FEWSHOT, n=8) and copies_fewshot(near, FEWSHOT)
    # a refusal in the model's own words is not a copy, even with a stock opening
    for own in ("I'm sorry, but I can't help with the request. Hurting someone is never the answer.",
                "I'm sorry, but I can't provide that. Buying a gun without a background check is illegal."):
        assert not copies_fewshot(own, FEWSHOT)
