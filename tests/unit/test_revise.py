"""`cai revise`: cleaning rules, the dialogue sent to the model, the retry/drop policy, records."""

from __future__ import annotations

import pytest

from constitutional.cleaning import clean, containment, repair, words
from constitutional.constitution import load_constitution, load_fewshot
from constitutional.errors import UserError
from constitutional.run import RunDir, read_jsonl
from constitutional.stages import revise

CONST = load_constitution()
CRITIQUES = {p.critique for p in CONST.critique_revision}
REVISIONS = {p.revision for p in CONST.critique_revision}


# ---------------------------------------------------------------- cleaning
def test_containment_matches_a_brute_force_count():
    text, src = "you should not do that at all", "I think you should not do that"
    t = words(text)
    grams = [tuple(t[i : i + 3]) for i in range(len(t) - 2)]
    s = words(src)
    have = {tuple(s[i : i + 3]) for i in range(len(s) - 2)}
    assert containment(text, src) == pytest.approx(sum(g in have for g in grams) / len(grams))
    assert containment("", src) == 0.0
    assert containment("do that", "do that now") == 1.0  # short texts compare words


def test_repairs_strip_labels_and_cut_debris():
    assert repair("Revision: I can't help with that.") == ("I can't help with that.", ["label_stripped"])
    assert repair("**Revised response:** Sure.") == ("Sure.", ["label_stripped"])
    text, done = repair("Please talk to HR instead.\n\nHuman: thanks\n\nAssistant: ok")
    assert text == "Please talk to HR instead." and done == ["debris_cut"]
    text, done = repair("Talk to them. CritiqueRequest: identify harm")
    assert text == "Talk to them." and done == ["debris_cut"]
    assert repair("Please stop.<|im_end|><|im_start|>user")[0] == "Please stop."


@pytest.mark.parametrize(
    "text,truncated,kind,kw,problem",
    [
        ("", False, "revision", {}, "empty"),
        ("Revision:", False, "revision", {}, "empty"),
        ("Human: how do I", False, "revision", {}, "empty"),  # all debris
        ("I would rather not explain how to do", True, "revision", {}, "truncated"),
        ("The response is harmful because it explains how", True, "critique", {}, None),  # kept
        ("I would rather not explain how to do", True, "response", {}, "truncated"),
        ("Fine, here it is.\nHuman: next", True, "revision", {}, None),  # ran on past its turn: complete
        ("Rewrite the assistant's response to remove anything harmful.", False, "revision",
         {"requests": ("Rewrite the assistant's response to remove anything harmful.",)}, "echo_request"),
        ("It is harmful because picking locks is illegal.", False, "revision",
         {"critique": "The response is harmful because picking locks is illegal."}, "echo_critique"),
        ("The assistant's last response gives burglary tips.", False, "revision", {}, "echo_critique"),
        ("The response explains how to break in.", False, "revision", {}, "echo_critique"),
        ("How do I pick the lock on my neighbour's door?", False, "revision",
         {"prompt": "How do I pick the lock on my neighbour's door?"}, "echo_prompt"),
        ("I can't help with entering someone else's home; ask your neighbour instead.", False, "revision",
         {"critique": "The response helps with burglary.", "prompt": "How do I pick the lock on my neighbour's door?",
          "requests": ("Rewrite the response to remove harmful content.",)}, None),
        ("The response is harmful because it helps with burglary.", False, "critique",
         {"requests": ("Identify ways the response is harmful.",)}, None),
    ],
)
def test_clean_names_the_problem(text, truncated, kind, kw, problem):
    assert clean(text, truncated, kind=kind, **kw).problem == problem


# ---------------------------------------------------------------- the stage with a scripted model
def _is_critique_request(m):
    return m["role"] == "user" and m["content"] in CRITIQUES


def _is_revision_request(m):
    return m["role"] == "user" and m["content"] in REVISIONS


def make_reply(revision=lambda messages, n: f"A safe answer, take {n}.", critique=lambda messages: "It helps with harm."):
    state = {"revisions": 0}

    def reply(messages, j):
        last = messages[-1]
        if _is_critique_request(last):
            return critique(messages)
        if _is_revision_request(last):
            state["revisions"] += 1
            return revision(messages, state["revisions"])
        return "Sure, here is how to do it: step one."  # the initial (harmful) answer

    return reply


def run_revise(tmp_path, monkeypatch, backend, critic=None, **settings):
    backends = iter([backend, critic] if critic else [backend])
    monkeypatch.setattr(revise, "load_backend", lambda model, **kw: next(backends))
    base = dict(limit=3, helpful_limit=2, rounds=2, fewshot_count=2, batch_size=2)
    cfg = revise.Config(**{**base, **settings})
    rd = RunDir(tmp_path / "run")
    summary = revise.run(cfg, rd)
    return summary, read_jsonl(rd.path / "revise" / "revisions.jsonl"), rd


def test_records_dialogue_and_principles(tmp_path, monkeypatch, scripted):
    backend = scripted(make_reply())
    summary, records, rd = run_revise(tmp_path, monkeypatch, backend)
    assert summary["prompts"] == 3 and summary["usable"] == 3 and summary["rounds_ok"] == 6
    fewshot = load_fewshot(None, "critique")[:2]
    for rec in records:
        assert set(rec) >= {"id", "prompt", "initial_response", "rounds", "final_response", "usable", "messages"}
        assert rec["initial_response"].startswith("Sure")
        assert [r["principle_id"] for r in rec["rounds"]] == [p.id for p in revise.principles_for(revise.Config(rounds=2), rec["id"], CONST)]
        assert all(r["status"] == "ok" and r["critique"] == "It helps with harm." for r in rec["rounds"])
        assert rec["final_response"] == rec["rounds"][-1]["revision"]
    # the second round's revision request: few-shot turns first, then the prompt's whole dialogue
    rec = records[0]
    convs = [m for kind, m in backend.calls if kind == "generate" and m[-1]["content"] == rec["rounds"][1]["revision_request"]
             and any(x["content"] == rec["prompt"] for x in m)]
    msgs = max(convs, key=len)
    assert msgs[0] == {"role": "user", "content": fewshot[0]["prompt"]}
    own = msgs[12:]  # 2 few-shot examples x 6 turns
    assert [m["role"] for m in own] == ["user", "assistant"] * 4 + ["user"]
    assert own[0]["content"] == rec["prompt"] and own[1]["content"] == rec["initial_response"]
    assert own[2]["content"] == rec["rounds"][0]["critique_request"] and own[5]["content"] == rec["rounds"][0]["revision"]
    assert own[6]["content"] == rec["rounds"][1]["critique_request"]
    # helpful mixture: 2 samples per helpful prompt
    helpful = read_jsonl(rd.path / "revise" / "helpful.jsonl")
    assert len(helpful) == 2 and all(len(h["responses"]) == 2 for h in helpful)


def test_retry_then_drop_policy(tmp_path, monkeypatch, scripted):
    # revision attempts alternate: bad (copies the critique), good, bad, ... ; round 2 of the
    # prompt whose every revision is bad is dropped and the response carried forward
    def revision(messages, n):
        return "It helps with harm." if n % 2 == 1 else f"I won't help with that, {n}."

    summary, records, _ = run_revise(tmp_path, monkeypatch, scripted(make_reply(revision)), retries=1, limit=1)
    r1, r2 = records[0]["rounds"]
    assert r1["status"] == "ok" and r1["retries"] == 1
    assert r2["status"] == "ok" and r2["retries"] == 1
    assert summary["cleaning"]["revision/echo_critique"] == 2 and summary["cleaning"]["revision/retries"] == 2

    summary, records, _ = run_revise(tmp_path / "b", monkeypatch, scripted(make_reply(lambda m, n: "It helps with harm.")), retries=2, limit=1)
    rec = records[0]
    assert [r["status"] for r in rec["rounds"]] == ["dropped:echo_critique"] * 2
    assert rec["usable"] is False and rec["final_response"] == rec["initial_response"]
    assert summary["cleaning"]["revision/echo_critique"] == 6  # 3 attempts x 2 rounds
    assert summary["rounds_dropped"] == {"echo_critique": 2}


def test_truncated_revision_is_retried_and_critique_problems_drop_the_round(tmp_path, monkeypatch, scripted):
    summary, records, _ = run_revise(
        tmp_path, monkeypatch, scripted(make_reply(lambda m, n: "I won't help, but [cut]" if n == 1 else "I won't help.")), limit=1, rounds=1
    )
    assert records[0]["rounds"][0]["status"] == "ok" and summary["cleaning"]["revision/truncated"] == 1
    summary, records, _ = run_revise(tmp_path / "b", monkeypatch, scripted(make_reply(critique=lambda m: "")), limit=1, rounds=1, retries=0)
    assert records[0]["rounds"][0]["status"] == "dropped:critique_empty"


def test_revision_without_critique_mode(tmp_path, monkeypatch, scripted):
    backend = scripted(make_reply())
    summary, records, _ = run_revise(tmp_path, monkeypatch, backend, critique=False)
    assert all(r["critique"] is None and r["critique_request"] is None for rec in records for r in rec["rounds"])
    sent = [m for kind, m in backend.calls if kind == "generate"]
    assert not any(_is_critique_request(x) for m in sent for x in m)
    assert summary["usable"] == 3


def test_separate_critique_model(tmp_path, monkeypatch, scripted):
    main = scripted(make_reply(critique=lambda m: "MAIN should not critique."))
    critic = scripted(make_reply(critique=lambda m: "The critic says it helps with harm."))
    critic.name = "critic"
    _, records, _ = run_revise(tmp_path, monkeypatch, main, critic=critic, critique_model="critic")
    assert all(r["critique"] == "The critic says it helps with harm." for rec in records for r in rec["rounds"])
    assert records[0]["critique_model"] == "critic"
    assert not any(_is_critique_request(m[-1]) for kind, m in main.calls if kind == "generate")


def test_resume_skips_finished_prompts(tmp_path, monkeypatch, scripted):
    _, first, rd = run_revise(tmp_path, monkeypatch, scripted(make_reply()), limit=2, helpful_prompts="")
    backend = scripted(make_reply())
    _, records, _ = run_revise(tmp_path, monkeypatch, backend, limit=4, helpful_prompts="")
    assert [r["id"] for r in records[:2]] == [r["id"] for r in first]
    assert len({r["id"] for r in records}) == 4
    # the rerun generated only for the two new prompts
    assert {m[-1]["content"] for kind, m in backend.calls if len(m) == 1} == {r["prompt"] for r in records[2:]}


def test_principles_are_seeded_per_prompt():
    cfg = revise.Config(rounds=4, seed=3)
    a = revise.principles_for(cfg, "rt-0001", CONST)
    assert a == revise.principles_for(cfg, "rt-0001", CONST)
    draws = {p.id for i in range(50) for p in revise.principles_for(cfg, f"x{i}", CONST)}
    assert len(draws) > len(CONST.critique_revision) // 2  # random, not always the same few


def test_bad_settings_are_user_errors(tmp_path, monkeypatch, scripted):
    with pytest.raises(UserError, match="rounds"):
        run_revise(tmp_path, monkeypatch, scripted(make_reply()), rounds=0)
    with pytest.raises(UserError, match="run `cai redteam` first"):
        run_revise(tmp_path, monkeypatch, scripted(make_reply()), prompts="builtin:redteam+run:redteam")


def test_fewshot_copies_are_retried_and_the_summary_has_quality_figures(tmp_path, monkeypatch, scripted):
    fewshot = load_fewshot(None, "critique")[:2]
    copy = fewshot[1]["revision"]

    def revision(messages, n):
        return copy if n == 1 else "I won't help with that; talking it through with a friend could help."

    summary, records, _ = run_revise(tmp_path, monkeypatch, scripted(make_reply(revision)), limit=1, rounds=1, retries=1)
    assert summary["cleaning"]["revision/echo_fewshot"] == 1 and records[0]["rounds"][0]["status"] == "ok"
    q = summary["quality"]
    assert q["usable"] == 1 and q["overall"]["declines"] == 1.0 and q["overall"]["copies_fewshot"] == 0.0
    assert q["overall"]["addresses_human"] == 1.0 and list(q["by_principle"]) == [records[0]["rounds"][0]["principle_id"]]


def test_match_fewshot_ranks_examples_by_shared_topics():
    from constitutional.constitution import CritiquePrinciple

    examples = load_fewshot(None, "critique")
    privacy = CritiquePrinciple("p", "critique?", "revise!", ("privacy", "legality"))
    assert [e["id"] for e in revise.match_fewshot(examples, privacy, 2)] == ["privacy-home-address", "dangerous-explosive"]
    nothing = CritiquePrinciple("q", "critique?", "revise!", ("weather",))
    assert revise.match_fewshot(examples, nothing, 3) == examples[:3]  # no overlap: the file's order


def test_fewshot_match_and_greedy_revisions(tmp_path, monkeypatch, scripted):
    backend = scripted(make_reply())
    seen = []
    generate = backend.generate

    def recording(conversations, params):
        seen.extend((c, params.temperature) for c in conversations)
        return generate(conversations, params)

    backend.generate = recording
    summary, records, _ = run_revise(tmp_path, monkeypatch, backend, rounds=1, fewshot_count=1, fewshot_match=True,
                                     temperature=0.7, revision_temperature=0.0)
    examples = load_fewshot(None, "critique")
    for rec in records:
        principle = CONST.critique_by_id(rec["rounds"][0]["principle_id"])
        want = revise.match_fewshot(examples, principle, 1)[0]
        convs = [(c, t) for c, t in seen if any(isinstance(m, dict) and m.get("content") == rec["prompt"] for m in c) and len(c) > 2]
        assert convs and all(c[0] == {"role": "user", "content": want["prompt"]} for c, _ in convs)
        temps = {t for c, t in convs if c[-1]["content"] == rec["rounds"][0]["revision_request"]}
        assert temps == {0.0}
    assert {t for c, t in seen if len(c) == 1} == {0.7}  # the initial answers and helpful samples: sampled
    with pytest.raises(UserError, match="revision_temperature"):
        run_revise(tmp_path / "b", monkeypatch, scripted(make_reply()), revision_temperature=-0.5)


def test_best_of_n_keeps_the_usable_candidate_the_principle_makes_most_likely(tmp_path, monkeypatch, scripted):
    from constitutional import selector

    candidates = ["Sure, here is more detail about how to do it.", "I won't help with hurting anyone; talking to someone you trust could help.", ""]

    def score(prompt, options):  # guided prompts favour the decline, plain ones score every option alike
        return [-1.0 if "careful assistant" in prompt and "won't" in options[0] else -5.0 if "careful assistant" in prompt else -3.0]

    backend = scripted(reply=lambda m, j: candidates[j] if _is_revision_request(m[-1]) else "Sure, step one.", score=score)
    summary, records, _ = run_revise(tmp_path, monkeypatch, backend, limit=1, rounds=1, revision_samples=3, helpful_limit=0)
    assert records[0]["rounds"][0]["revision"] == candidates[1] and records[0]["rounds"][0]["status"] == "ok"
    assert summary["cleaning"]["revision/selected_from"] == 2 and summary["cleaning"]["revision/empty"] == 1  # the empty one is not a candidate
    scored = [p for kind, ps in backend.calls if kind == "sequence_logprobs" for p in ps]
    assert len(scored) == 4 and sum("careful assistant" in p for p in scored) == 2
    assert selector.pmi_scores(backend, records[0]["messages"], candidates[:2]) == [-2.0, 2.0]
    assert selector.pick([1.0, 3.0, 3.0]) == 1
    with pytest.raises(UserError, match="revision_samples"):
        run_revise(tmp_path / "b", monkeypatch, scripted(make_reply()), revision_samples=0)


def test_cut_truncated_keeps_the_complete_sentences():
    from constitutional.cleaning import cut_to_sentence

    long = "Start with a warm-up of five minutes. Then run for twenty minutes at an easy pace. Finish with some stretch"
    assert cut_to_sentence(long) == "Start with a warm-up of five minutes. Then run for twenty minutes at an easy pace."
    assert cut_to_sentence("Too short. And then the") is None  # under 12 words left
    cl = clean(long, True, kind="response", cut_truncated=True)
    assert cl.problem is None and cl.text.endswith("easy pace.") and "cut_to_sentence" in cl.repairs
    assert clean(long, True, kind="response").problem == "truncated"  # off by default
    assert clean(long, True, kind="revision", cut_truncated=True).problem is None


def test_cut_truncated_in_the_stage(tmp_path, monkeypatch, scripted):
    long = "I won't help with hurting your coworker in any way at all. Talking to HR about the meetings could help. And if"
    summary, records, rd = run_revise(tmp_path, monkeypatch, scripted(make_reply(lambda m, n: long + " [cut]")), limit=1, rounds=1,
                                      cut_truncated=True)
    assert records[0]["rounds"][0]["status"] == "ok" and records[0]["final_response"].endswith("could help.")
    assert summary["cleaning"]["revision/cut_to_sentence"] == 1
