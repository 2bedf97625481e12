"""The feedback templates (the exact text the feedback model sees) and the label maths vs brute force."""

from __future__ import annotations

import math

import pytest

from constitutional import feedback as fb

EXAMPLE = {
    "conversation": "Human: Can I eat raw eggs?",
    "principle": "Which response is more accurate?",
    "options": ["Yes, always safe.", "There is a small salmonella risk."],
    "answer": "B",
    "reasoning": "A overstates safety. So option B is better.",
}
CONV = [{"role": "user", "content": "How do I stay safe online?"}]
QUESTION = (
    "Consider the following conversation between a human and an assistant:\n\n"
    "Human: How do I stay safe online?\n\n"
    "Which is less harmful?\n"
    "Options:\n"
    "(A) Use strong passwords.\n"
    "(B) Share your password."
)
EX_QUESTION = (
    "Consider the following conversation between a human and an assistant:\n\n"
    "Human: Can I eat raw eggs?\n\n"
    "Which response is more accurate?\n"
    "Options:\n"
    "(A) Yes, always safe.\n"
    "(B) There is a small salmonella risk."
)


def test_render_question_is_the_paper_template():
    assert fb.render_question(CONV, "Which is less harmful?", "Use strong passwords.", "Share your password.") == QUESTION
    # a transcript string is used as given; multi-turn messages become a transcript
    multi = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    q = fb.render_question(multi, "P?", "a", "b")
    assert "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nP?\n" in q and "sys" not in q
    assert fb.render_question("Human: hi", "P?", "a", "b") == fb.render_question([{"role": "user", "content": "hi"}], "P?", "a", "b")


def test_raw_text_exact():
    text = fb.raw_text(QUESTION, [EXAMPLE])
    assert text == EX_QUESTION + "\nThe answer is: (B)\n\n" + QUESTION + "\nThe answer is:"
    assert fb.raw_text(QUESTION, []) == QUESTION + "\nThe answer is:"


def test_chat_text_exact(tiny_backend):
    text = tiny_backend.render_chat(fb.chat_messages(QUESTION, [EXAMPLE]))
    assert text == (
        f"<|im_start|>user\n{EX_QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is: (B)<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\nThe answer is:"
    )


def test_cot_prefill_and_answer_exact(tiny_backend):
    # sampling: the assistant turn opens with the CoT prefix; few-shot examples show their reasoning
    gen = tiny_backend.render_chat(fb.chat_messages(QUESTION, [EXAMPLE], cot=True))
    assert gen == (
        f"<|im_start|>user\n{EX_QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\nLet's think step-by-step: A overstates safety. So option B is better.\nSo the answer is: (B)<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\nLet's think step-by-step:"
    )
    # scoring: the sampled reasoning, then the answer prompt
    score = tiny_backend.render_chat(fb.chat_messages(QUESTION, [EXAMPLE], cot=True, reasoning=" B shares secrets. "))
    assert score == gen + " B shares secrets.\nSo the answer is:"
    assert fb.answer_prefix(True, "") == "Let's think step-by-step:\nSo the answer is:"


def test_cut_reasoning_stops_before_its_own_answer():
    assert fb.cut_reasoning(" A is kind. So the answer is: (A)") == "A is kind."
    assert fb.cut_reasoning("B lies.\nThe answer is (B)\nHuman: next") == "B lies."
    assert fb.cut_reasoning("no stop here ") == "no stop here"


def brute_softmax(la, lb):
    ea, eb = math.exp(la), math.exp(lb)
    return ea / (ea + eb)


@pytest.mark.parametrize("la,lb", [(0.0, 0.0), (-1.0, -2.0), (-3.5, -0.2), (-30.0, -31.0), (5.0, -5.0), (-700.0, -699.0)])
def test_normalise_pair_matches_brute_force(la, lb):
    assert fb.normalise_pair(la, lb) == pytest.approx(brute_softmax(la, lb), rel=1e-12, abs=1e-15)


def test_normalise_pair_extreme_values():
    # where exp() would under/overflow in the naive formula
    assert fb.normalise_pair(-1e4, -1e4 + 1.0) == pytest.approx(1 / (1 + math.e))
    assert fb.normalise_pair(-2000.0, 0.0) == 0.0
    assert fb.normalise_pair(0.0, -2000.0) == 1.0
    assert fb.normalise_pair(1e308, -1e308) == 1.0
    assert fb.normalise_pair(-math.inf, -5.0) == 0.0
    assert fb.normalise_pair(-math.inf, -math.inf) == 0.5
    p = fb.normalise_pair(-3.0, -1.0)
    assert p + fb.normalise_pair(-1.0, -3.0) == pytest.approx(1.0)


def test_order_average_cancels_position_bias():
    assert fb.order_average(0.9, 0.9) == 0.5  # always picks (A): no preference between the responses
    assert fb.order_average(0.2, 0.2) == 0.5
    assert fb.order_average(0.9, 0.1) == pytest.approx(0.9)  # consistent: response 0 wins in both
    assert fb.order_average(0.8, 0.4) == pytest.approx((0.8 + 0.6) / 2)


def test_clamp_and_ensemble_mean():
    assert fb.clamp(0.99, 0.4, 0.6) == 0.6
    assert fb.clamp(0.01, 0.4, 0.6) == 0.4
    assert fb.clamp(0.55, 0.4, 0.6) == 0.55
    assert fb.ensemble_mean([0.2, 0.5, 0.8, 0.9]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        fb.ensemble_mean([])


def test_position_stats():
    pairs = [(0.9, 0.9), (0.3, 0.2), (0.8, 0.1), (0.5, 0.7)]  # same position twice, same response once, one tie
    st = fb.position_stats(pairs)
    assert st == {"position_bias_rate": 0.5, "order_consistency": 0.25, "order_ties": 0.25, "share_A": 0.5}
    assert fb.position_stats([(0.1, 0.2), (0.3, 0.6)])["share_A"] == 0.25
    assert fb.position_stats([])["position_bias_rate"] is None


def test_histogram_bins():
    h = fb.histogram([0.5, 0.59, 0.6, 0.75, 0.9, 1.0, 0.99])
    assert h == {"0.5-0.6": 2, "0.6-0.7": 1, "0.7-0.8": 1, "0.8-0.9": 0, "0.9-1.0": 3}


def test_calibration_hand_computed():
    # bin 0.5-0.6: p 0.5 (tie, credit 0.5), 0.55 (right) -> mean_p 0.525, acc 0.75
    # bin 0.9-1.0: p 0.9 (right), 1.0 (wrong)            -> mean_p 0.95,  acc 0.5
    p = [0.5, 0.55, 0.9, 1.0]
    c = [0.5, 1.0, 1.0, 0.0]
    bins, ece = fb.calibration(p, c)
    assert [b["count"] for b in bins] == [2, 0, 0, 0, 2]
    assert bins[0]["mean_p"] == pytest.approx(0.525) and bins[0]["accuracy"] == pytest.approx(0.75)
    assert bins[4]["mean_p"] == pytest.approx(0.95) and bins[4]["accuracy"] == pytest.approx(0.5)
    assert bins[1]["mean_p"] is None
    assert ece == pytest.approx(0.5 * abs(0.75 - 0.525) + 0.5 * abs(0.5 - 0.95))
    perfect, ece0 = fb.calibration([1.0, 1.0], [1.0, 1.0])
    assert ece0 == 0.0 and perfect[4]["accuracy"] == 1.0


def test_verdict_says_plainly_when_labels_carry_little_signal():
    v = fb.verdict(0.51, 0.97)
    assert v == ("labeler near chance (MC accuracy 0.51) and position-dominated "
                 "(same position wins both orders in 97% of comparisons): its preference labels carry little signal")
    assert "position-dominated" in fb.verdict(0.9, 0.85) and "near chance" not in fb.verdict(0.9, 0.85)
    assert "worse than chance" in fb.verdict(0.2, 0.1)
    good = fb.verdict(0.85, 0.1, 0.04)
    assert "little signal" not in good and "MC accuracy 0.85, ECE 0.04" in good
    assert "no multiple-choice check" in fb.verdict(None, 0.2)
