"""`cai label` on the tiny model (stored log-probs vs a manual forward pass) and on scripted backends
(position bias, a real preference, CoT clamping, ensembles, resume, bad input)."""

from __future__ import annotations

import json

import pytest

from constitutional import feedback as fb
from constitutional.constitution import load_constitution, load_fewshot
from constitutional.errors import UserError
from constitutional.run import RunDir, read_jsonl
from constitutional.stages import label

PAIRS = [
    {"id": "p1", "prompt": "How do I bake bread?", "messages": [{"role": "user", "content": "How do I bake bread?"}],
     "category": "helpful", "split": "train", "responses": ["Mix flour, water, yeast.", "It is safe to knead, then bake."]},
    {"id": "p2", "prompt": "Pick a lock?", "messages": [{"role": "user", "content": "Pick a lock?"}],
     "category": "harmful", "split": "test", "responses": ["I would rather keep you safe.", "Use a pick.", "Sure.", "No, that is not safe."]},
    {"id": "p3", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "split": "train", "responses": ["Hello, stay safe!", "Go away."]},
]

# the comparisons the stage makes of PAIRS: consecutive pairs of responses
RESPONSES = {"p1": PAIRS[0]["responses"], "p2-0": PAIRS[1]["responses"][:2], "p2-1": PAIRS[1]["responses"][2:], "p3": PAIRS[2]["responses"]}


def write_pairs(path, pairs=PAIRS):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def run_label(tmp_path, backend, monkeypatch, data=PAIRS, **settings):
    """Run the stage on the pairs `data` (written where `cai sample` writes them; None: none) with
    `backend` as the feedback model; `settings` are the stage's Config fields."""
    calls = []

    def fake_load_backend(model, **kw):
        calls.append((model, kw))
        return backend

    monkeypatch.setattr(label, "load_backend", fake_load_backend)
    rd = RunDir(tmp_path / "run")
    if data is not None:
        write_pairs(rd.path / "sample" / "pairs.jsonl", data)
    settings.setdefault("mc", "")
    summary = label.run(label.Config(**settings), rd)
    return summary, read_jsonl(rd.path / "label" / "preferences.jsonl"), calls


def options_of(prompt: str) -> tuple[str, str]:
    """The (A) and (B) responses of the last question in a rendered prompt."""
    q = prompt[prompt.rindex("Options:\n") :]
    a = q[q.index("(A) ") + 4 : q.index("\n(B) ")]
    b = q[q.index("\n(B) ") + 5 :].split("\n")[0]
    return a, b


def prefers_safe(prompt, options):
    """A scripted labeler that prefers the response mentioning "safe", whatever its position."""
    text = dict(zip(("(A)", "(B)"), options_of(prompt)))
    return [0.0 if "safe" in text[o.strip()] else -4.0 for o in options]


# ---------------------------------------------------------------- the real forward pass
def check_against_brute_force(backend, records, examples, chat, constitution):
    for rec in records:
        r0, r1 = RESPONSES[rec["id"]]
        assert {rec["chosen"], rec["rejected"]} == {r0, r1}
        for o in rec["orders"]:
            text = constitution.feedback_by_id(o["principle_id"]).text
            a, b = (r0, r1) if o["order"] == "AB" else (r1, r0)
            question = fb.render_question(rec["messages"], text, a, b)
            prompt = backend.render_chat(fb.chat_messages(question, examples)) if chat else fb.raw_text(question, examples)
            ref = backend.brute_force_option_logprobs(prompt, [" (A)", " (B)"])
            assert [o["logprob_A"], o["logprob_B"]] == pytest.approx(ref, abs=1e-4)
            assert o["p_A"] == pytest.approx(fb.normalise_pair(*ref), abs=1e-4)
        ab = [o["p_A"] for o in rec["orders"] if o["order"] == "AB"]
        ba = [o["p_A"] for o in rec["orders"] if o["order"] == "BA"]
        p0 = fb.ensemble_mean([fb.order_average(x, y) for x, y in zip(ab, ba)])
        assert rec["p_response0"] == pytest.approx(p0)
        assert rec["p_chosen"] == pytest.approx(max(p0, 1 - p0))
        assert rec["chosen"] == (r0 if p0 >= 0.5 else r1)


@pytest.mark.parametrize("chat", [True, False])
def test_stored_logprobs_equal_a_manual_forward_pass(tmp_path, tiny_backend, monkeypatch, chat):
    summary, records, calls = run_label(tmp_path, tiny_backend, monkeypatch, chat=chat, fewshot=0, batch_size=2)
    assert calls == [("embedded", {"dtype": "float32", "batch_size": 2})]  # auto: no SL-CAI model in this run
    assert [r["id"] for r in records] == ["p1", "p2-0", "p2-1", "p3"]
    assert summary["comparisons"] == 4 and all(len(r["orders"]) == 2 for r in records)
    check_against_brute_force(tiny_backend, records, [], chat, load_constitution())


def test_few_shot_prefix_and_ensemble_equal_a_manual_forward_pass(tmp_path, tiny_model_dir, monkeypatch):
    # the shared few-shot prefix goes through the prefix cache
    from constitutional.backends.hf import HFBackend

    backend = HFBackend(str(tiny_model_dir), dtype="float32", batch_size=3, min_prefix_tokens=4)
    summary, records, _ = run_label(tmp_path, backend, monkeypatch, data=PAIRS[:1] + PAIRS[2:], fewshot=2, principles=2)
    assert backend.stats["prefix_tokens_reused"] > 0
    assert all(len(r["principle_ids"]) == 2 and len(r["orders"]) == 4 for r in records)
    check_against_brute_force(backend, records, load_fewshot(None, "feedback")[:2], True, load_constitution())


# ---------------------------------------------------------------- scripted labelers
def test_position_only_labeler_gives_ties_and_says_so(tmp_path, scripted, monkeypatch):
    backend = scripted(score=lambda prompt, options: [0.0, -3.0])  # always (A)
    summary, records, _ = run_label(tmp_path, backend, monkeypatch, mc="builtin:mc", mc_limit=6)
    assert all(r["p_chosen"] == 0.5 and r["tie"] and r["hard_label"] == "A" for r in records)
    assert all(r["chosen"] == RESPONSES[r["id"]][0] and r["rejected"] == RESPONSES[r["id"]][1] for r in records)
    assert summary["ties"] == summary["comparisons"] == 4
    assert summary["position_bias_rate"] == 1.0 and summary["order_consistency"] == 0.0
    assert summary["p_chosen_histogram"]["0.5-0.6"] == 4
    mc = summary["mc"]
    assert mc["items"] == 6 and mc["scored_as_given"] == 0 and mc["accuracy"] == 0.5 and mc["position_bias_rate"] == 1.0
    assert "near chance (MC accuracy 0.50)" in summary["verdict"]
    assert "position-dominated (same position wins both orders in 100% of comparisons)" in summary["verdict"]
    assert "little signal" in summary["verdict"]
    on_disk = json.loads((tmp_path / "run" / "label" / "diagnostics.json").read_text())
    assert on_disk["verdict"] == summary["verdict"] and len(read_jsonl(tmp_path / "run" / "label" / "mc.jsonl")) == 6


def test_a_real_preference_wins_in_both_orders(tmp_path, scripted, monkeypatch):
    backend = scripted(score=prefers_safe)
    mc_file = tmp_path / "mc.jsonl"
    rows = [
        {"id": "m1", "subset": "s", "question": "Q1?", "correct_response": "Keep it safe.", "incorrect_response": "Whatever.", "correct_position": "B",
         "prompt": "unused", "corrects": [" (B)"], "incorrects": [" (A)"]},
        {"id": "m2", "subset": "g", "prompt": fb.render_question("Human: Q2?", "Which?", "Risky.", "The safe one.") + "\nThe answer is:",
         "corrects": [" (B)"], "incorrects": [" (A)"]},
    ]
    mc_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, records, _ = run_label(tmp_path, backend, monkeypatch, mc=str(mc_file))
    by_id = {r["id"]: r for r in records}
    assert by_id["p1"]["chosen"] == "It is safe to knead, then bake." and by_id["p1"]["hard_label"] == "B"
    assert by_id["p2-0"]["chosen"] == "I would rather keep you safe." and by_id["p2-0"]["hard_label"] == "A"
    assert by_id["p2-1"]["chosen"] == "No, that is not safe." and by_id["p2-1"]["rejected"] == "Sure."
    assert by_id["p3"]["chosen"] == "Hello, stay safe!"
    for r in records:
        assert r["p_chosen"] == pytest.approx(fb.normalise_pair(0.0, -4.0))
        assert {o["order"]: round(o["p_A"]) for o in r["orders"]} == ({"AB": 1, "BA": 0} if r["hard_label"] == "A" else {"AB": 0, "BA": 1})
        assert r["feedback_model"] == "scripted" and r["split"] in ("train", "test")
    assert by_id["p1"]["category"] == "helpful" and by_id["p2-0"]["prompt"] == "Pick a lock?"
    assert summary["order_consistency"] == 1.0 and summary["position_bias_rate"] == 0.0 and summary["ties"] == 0
    assert summary["principle_agreement"] is None  # one principle per comparison
    mc = summary["mc"]
    assert mc["items"] == 2 and mc["scored_as_given"] == 1 and mc["accuracy"] == 1.0
    assert mc["accuracy_by_subset"] == {"g": 1.0, "s": 1.0} and mc["ece"] == pytest.approx(1 - fb.normalise_pair(0.0, -4.0), abs=1e-4)
    assert "little signal" not in summary["verdict"] and "MC accuracy 1.00" in summary["verdict"]


@pytest.mark.parametrize("lo,hi", [(0.4, 0.6), (0.3, 0.8)])
def test_cot_reasoning_is_recorded_and_probabilities_clamped(tmp_path, scripted, monkeypatch, lo, hi):
    backend = scripted(reply=lambda messages, j: "The safe reply is kinder. So the answer is: (A)", score=prefers_safe)
    kw = {} if (lo, hi) == (0.4, 0.6) else {"clamp_low": lo, "clamp_high": hi}
    summary, records, _ = run_label(tmp_path, backend, monkeypatch, cot=True, fewshot=1, **kw)
    for r in records:
        for o in r["orders"]:
            assert o["cot"] == "The safe reply is kinder."
            assert o["p_A"] in (lo, hi) and abs(o["p_A_raw"] - 0.5) > 0.45
        assert r["p_chosen"] == pytest.approx((hi + 1 - lo) / 2)
    gens = [c[1] for c in backend.calls if c[0] == "generate"]
    assert len(gens) == 8 and gens[0][-1] == {"role": "assistant", "content": "Let's think step-by-step:"}
    assert gens[0][1]["content"].startswith("Let's think step-by-step: Option A declines")  # few-shot reasoning
    scored = [p for c in backend.calls if c[0] == "option_logprobs" for p in c[1]]
    assert all(p.endswith("Assistant: Let's think step-by-step: The safe reply is kinder.\nSo the answer is:") for p in scored)


def test_ensemble_records_k_principles(tmp_path, scripted, monkeypatch):
    summary, records, _ = run_label(tmp_path, scripted(score=prefers_safe), monkeypatch, principles=3, seed=5)
    constitution = load_constitution()
    for r in records:
        assert len(r["principle_ids"]) == 3 == len(set(r["principle_ids"])) and len(r["orders"]) == 6
        assert r["principle_ids"] == [p.id for p in label.draw_principles(constitution, 3, 5, r["id"])]
    assert summary["principle_agreement"] == 1.0 and summary["principles_per_comparison"] == 3


def test_single_principle_is_drawn_per_comparison_and_seeded(tmp_path, scripted, monkeypatch):
    many = [dict(PAIRS[0], id=f"q{i}") for i in range(12)]
    _, records, _ = run_label(tmp_path, scripted(), monkeypatch, data=many, seed=1)
    ids = [r["principle_ids"][0] for r in records]
    assert len(set(ids)) > 1  # drawn at random, not one fixed principle
    assert ids == [label.draw_principles(load_constitution(), 1, 1, r["id"])[0].id for r in records]


def test_resume_after_partial_output(tmp_path, scripted, monkeypatch):
    many = [dict(PAIRS[0], id=f"q{i}") for i in range(6)]
    run_label(tmp_path, scripted(score=prefers_safe), monkeypatch, data=many, batch_size=2)
    shard = tmp_path / "run" / "label" / "preferences.jsonl"
    lines = shard.read_text().splitlines()
    shard.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed while writing the 4th record
    again = scripted(score=prefers_safe)
    summary, records, _ = run_label(tmp_path, again, monkeypatch, data=many, batch_size=2)
    assert [r["id"] for r in records] == [f"q{i}" for i in range(6)]
    assert [json.loads(x) for x in lines] == records  # same labels as the uninterrupted run
    scored = sum(len(c[1]) for c in again.calls if c[0] == "option_logprobs")
    assert scored == 3 * 2  # only the 3 missing comparisons, both orders
    assert summary["comparisons"] == 6 and summary["labeled_now"] == 3


def test_limit_and_explicit_pairs_path(tmp_path, scripted, monkeypatch):
    path = write_pairs(tmp_path / "elsewhere.jsonl")
    summary, records, _ = run_label(tmp_path, scripted(), monkeypatch, data=None, pairs=str(path), limit=2)
    assert summary["comparisons"] == 2 and [r["id"] for r in records] == ["p1", "p2-0"]
    assert not (tmp_path / "run" / "sample").exists()


# ---------------------------------------------------------------- bad input
def test_missing_pairs_points_to_cai_sample(tmp_path, scripted, monkeypatch):
    with pytest.raises(UserError, match="run `cai sample` first"):
        run_label(tmp_path, scripted(), monkeypatch, data=None)
    with pytest.raises(UserError, match="pairs file not found.*cai sample"):
        run_label(tmp_path, scripted(), monkeypatch, data=None, pairs=str(tmp_path / "nope.jsonl"))
    assert not (tmp_path / "run" / "label" / "preferences.jsonl").exists()


@pytest.mark.parametrize("line,match", [
    ('{"id": "a", "prompt": "hi", "responses": ["only one"]}', r"pairs.jsonl:2 \(responses\)"),
    ('{"id": "a", "prompt": "hi", "responses": ["x", ', r"pairs.jsonl:2: malformed JSON"),
    ('{"id": "p1", "prompt": "hi", "responses": ["x", "y"]}', "duplicate comparison id 'p1'"),
    ('{"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "responses": ["x", "y"]}',
     r"pairs.jsonl:2 \(messages\): the conversation must end with the human's turn"),
])
def test_malformed_pairs_are_user_errors(tmp_path, scripted, monkeypatch, line, match):
    path = write_pairs(tmp_path / "run" / "sample" / "pairs.jsonl", PAIRS[:1])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(UserError, match=match):
        run_label(tmp_path, scripted(), monkeypatch, data=None)


@pytest.mark.parametrize("settings,match", [
    ({"cot": True, "chat": False}, "needs label.chat = true"),
    ({"principles": 99}, "label.principles = 99"),
    ({"fewshot": 9}, "label.fewshot = 9"),
    ({"clamp_low": 0.6, "clamp_high": 0.7}, "clamp_low <= 0.5"),
])
def test_bad_settings_are_user_errors(tmp_path, scripted, monkeypatch, settings, match):
    with pytest.raises(UserError, match=match):
        run_label(tmp_path, scripted(), monkeypatch, **settings)
