"""AI feedback as a multiple-choice question: the templates and the label maths (pure functions).

Paper: Bai et al. 2022, "Constitutional AI", Section 4.1 (seeds: "Reinforcement Learning Stage:
RLAI", "Chain of Thought (CoT) prompting"). The feedback model reads

    Consider the following conversation between a human and an assistant:

    [HUMAN/ASSISTANT CONVERSATION]

    [PRINCIPLE FOR MULTIPLE CHOICE EVALUATION]
    Options:
    (A) [RESPONSE A]
    (B) [RESPONSE B]
    The answer is:

and the log-probabilities of the continuations " (A)" and " (B)", normalised over the two, give
p(A) and p(B). Few-shot examples (`data/fewshot_feedback.yaml`) come first. The conversation is in
the paper's transcript form (`Human: ...`), the same form the few-shot examples use.

How the template meets a chat model (`chat=True`, the default): the question (everything up to
"Options: ... (B) ...") is the user message, and "The answer is:" opens the assistant turn as a
prefill, so the option tokens are scored where a chat model actually answers; a fresh assistant turn
without the prefill would let it start with anything ("Sure! ..."), so " (A)" would not be a natural
continuation. Each few-shot example is an earlier user turn (its question) and assistant turn ("The
answer is: (A)"), which teaches the answer format and, coming first, is a prefix shared by every
prompt (the hf backend encodes it once). A model without a chat template gets the same conversation
in the transcript form `Human: [question]\\n\\nAssistant: The answer is:`. `chat=False` is the paper's
plain text for pre-trained models: few-shot blocks, then the question, each ending "The answer is:".

Chain of thought: the assistant turn opens with "Let's think step-by-step:" instead, the model
samples its reasoning (cut before it states an answer itself, `cut_reasoning`), then
"\\nSo the answer is:" is appended and the options are scored after it. Few-shot examples show their
`reasoning` the same way. For a model without a chat template this is the seeds' CoT template
`Human: ... Assistant: Let's think step-by-step: [CHAIN-OF-THOUGHT]` exactly. CoT needs the chat
path, since the backend protocol samples only from chat conversations (a prefill continues the text).

Label maths: `normalise_pair` (softmax over two log-probs), `order_average` (both orders, which
cancels a labeler's preference for a position), `clamp` (the paper clamps CoT probabilities to
40-60%, since they are overconfident), `ensemble_mean` (over principles), and the diagnostics:
`position_stats`, `histogram`, `calibration` (bins + expected calibration error), `verdict`.
Additions to the method as Section 4.1 describes it: every comparison is scored in both orders and
the two are averaged (small labelers are dominated by position: SmolLM2-135M picks (A) on all 72
built-in multiple-choice items), and the CoT clamp is applied to each order before averaging.
"""

from __future__ import annotations

import math
from typing import Sequence

from .data.loaders import to_transcript

QUESTION_TEMPLATE = (
    "Consider the following conversation between a human and an assistant:\n\n"
    "{conversation}\n\n"
    "{principle}\n"
    "Options:\n"
    "(A) {response_a}\n"
    "(B) {response_b}"
)
ANSWER_PREFIX = "The answer is:"
COT_PREFIX = "Let's think step-by-step:"
COT_ANSWER = "\nSo the answer is:"
OPTIONS = (" (A)", " (B)")
FEWSHOT_SEPARATOR = "\n\n"
# Phrases after which a sampled chain of thought has started to answer (or to invent a next turn).
COT_STOP = ("So the answer is", "The answer is", "\nHuman:")
HISTOGRAM_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CHANCE_MARGIN = 0.1  # MC accuracy within this of 0.5: "near chance"
POSITION_DOMINATED = 0.8  # the same position wins both orders more often than this: "position-dominated"
TIE_TOL = 1e-9


def render_question(conversation: Sequence[dict] | str, principle: str, response_a: str, response_b: str) -> str:
    """The multiple-choice question, without the answer prefix.

    conversation: chat messages (rendered as a transcript) or a transcript string used as given.
    """
    conv = conversation if isinstance(conversation, str) else to_transcript(list(conversation))
    return QUESTION_TEMPLATE.format(
        conversation=conv.strip(), principle=principle.strip(), response_a=response_a.strip(), response_b=response_b.strip()
    )


def answer_prefix(cot: bool, reasoning: str | None = None) -> str:
    """What opens the answer: "The answer is:", or "Let's think step-by-step:" [+ " reasoning
    \\nSo the answer is:" once the reasoning has been sampled]."""
    if not cot:
        return ANSWER_PREFIX
    if reasoning is None:
        return COT_PREFIX
    return f"{COT_PREFIX} {reasoning.strip()}".rstrip() + COT_ANSWER


def example_question(example: dict) -> str:
    """A few-shot example's question (fields conversation, principle, options[A, B])."""
    a, b = example["options"][:2]
    return render_question(example["conversation"], example["principle"], a, b)


def example_answer(example: dict, cot: bool) -> str:
    """A few-shot example's answer, e.g. "The answer is: (A)" (with its reasoning in CoT mode)."""
    return answer_prefix(cot, example.get("reasoning", "") if cot else None) + f" ({str(example['answer']).strip()})"


def chat_messages(question: str, examples: Sequence[dict], cot: bool = False, reasoning: str | None = None) -> list[dict]:
    """The feedback conversation for a chat model: few-shot turns, the question, the assistant prefill.

    The last message is an assistant message, which the backend continues (a prefill).
    """
    messages: list[dict] = []
    for ex in examples:
        messages.append({"role": "user", "content": example_question(ex)})
        messages.append({"role": "assistant", "content": example_answer(ex, cot)})
    messages.append({"role": "user", "content": question})
    messages.append({"role": "assistant", "content": answer_prefix(cot, reasoning)})
    return messages


def raw_text(question: str, examples: Sequence[dict]) -> str:
    """The paper's plain text for a pre-trained model: few-shot blocks, then the question."""
    blocks = [f"{example_question(ex)}\n{example_answer(ex, cot=False)}" for ex in examples]
    blocks.append(f"{question}\n{ANSWER_PREFIX}")
    return FEWSHOT_SEPARATOR.join(blocks)


def cut_reasoning(text: str, stops: Sequence[str] = COT_STOP) -> str:
    """A sampled chain of thought up to (not including) the first stop phrase, stripped."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


# ---------------------------------------------------------------- label maths
def normalise_pair(logp_a: float, logp_b: float) -> float:
    """p(A) = exp(la) / (exp(la) + exp(lb)): a softmax over two log-probs (nats), stable for any
    magnitude; equal values (also both -inf) give 0.5."""
    if logp_a == logp_b:
        return 0.5
    if logp_a >= logp_b:
        return 1.0 / (1.0 + math.exp(logp_b - logp_a))
    e = math.exp(logp_a - logp_b)
    return e / (1.0 + e)


def order_average(p_a_first: float, p_a_second: float) -> float:
    """P(response 0 is better) from both orders: response 0 is (A) in the first order and (B) in the
    second, so P = (pA_first + pB_second) / 2 = (pA_first + 1 - pA_second) / 2. A labeler that only
    prefers a position (same pA in both orders) gets exactly 0.5."""
    return 0.5 * (p_a_first + (1.0 - p_a_second))


def clamp(p: float, lo: float, hi: float) -> float:
    """p limited to [lo, hi] (the paper clamps chain-of-thought probabilities to [0.4, 0.6])."""
    return min(max(p, lo), hi)


def ensemble_mean(ps: Sequence[float]) -> float:
    """Mean of probabilities from several principles (an ensemble over the constitution)."""
    if not ps:
        raise ValueError("ensemble_mean of no probabilities")
    return sum(ps) / len(ps)


def winner(p: float) -> int | None:
    """0 if p > 0.5 (the first of the two wins), 1 if p < 0.5, None for a tie (within TIE_TOL)."""
    if abs(p - 0.5) <= TIE_TOL:
        return None
    return 0 if p > 0.5 else 1


def position_stats(pairs: Sequence[tuple[float, float]]) -> dict:
    """Position bias from (pA in order AB, pA in order BA) per comparison.

    position_bias_rate: share where the same position wins in both orders (the labeler followed the
    position, not the response); order_consistency: share where the same response wins in both
    orders; order_ties: share where either order is an exact tie. The three sum to 1.
    share_A: share of the single-order judgements (2 per comparison) that (A) wins: which position
    a biased labeler favours (it depends on the template: SmolLM2-135M picks (A) on the raw
    multiple-choice text and (B) in the chat form).
    """
    n = len(pairs)
    if n == 0:
        return {"position_bias_rate": None, "order_consistency": None, "order_ties": None, "share_A": None}
    share_a = sum(winner(p) == 0 for pair in pairs for p in pair) / (2 * n)
    same_pos = same_resp = ties = 0
    for p1, p2 in pairs:
        w1, w2 = winner(p1), winner(p2)
        if w1 is None or w2 is None:
            ties += 1
        elif w1 == w2:
            same_pos += 1
        else:
            same_resp += 1
    return {"position_bias_rate": same_pos / n, "order_consistency": same_resp / n, "order_ties": ties / n, "share_A": share_a}


def _bin(p: float, edges: Sequence[float]) -> int:
    for k in range(len(edges) - 1):
        if p < edges[k + 1]:
            return k
    return len(edges) - 2  # the last bin is closed: [0.9, 1.0]


def histogram(ps: Sequence[float], edges: Sequence[float] = HISTOGRAM_EDGES) -> dict[str, int]:
    """Counts of p in [e0, e1), [e1, e2), ..., [e_{n-1}, e_n]; keys like "0.5-0.6"."""
    counts = [0] * (len(edges) - 1)
    for p in ps:
        counts[_bin(p, edges)] += 1
    return {f"{edges[k]:.1f}-{edges[k + 1]:.1f}": c for k, c in enumerate(counts)}


def calibration(p_chosen: Sequence[float], correct: Sequence[float], edges: Sequence[float] = HISTOGRAM_EDGES) -> tuple[list[dict], float | None]:
    """Calibration bins and expected calibration error (ECE).

    p_chosen: predicted probability of the chosen answer, in [0.5, 1]; correct: 1.0 when the chosen
    answer is right, 0.0 when wrong (0.5 for a tie, the expected score of a coin flip).
    Returns ([{bin, count, mean_p, accuracy}], ECE = sum_b (n_b / N) * |accuracy_b - mean_p_b|).
    """
    if len(p_chosen) != len(correct):
        raise ValueError("p_chosen and correct differ in length")
    groups: list[list[tuple[float, float]]] = [[] for _ in range(len(edges) - 1)]
    for p, c in zip(p_chosen, correct):
        groups[_bin(p, edges)].append((p, c))
    bins, ece, n = [], 0.0, len(p_chosen)
    for k, g in enumerate(groups):
        mean_p = sum(p for p, _ in g) / len(g) if g else None
        acc = sum(c for _, c in g) / len(g) if g else None
        bins.append({"bin": f"{edges[k]:.1f}-{edges[k + 1]:.1f}", "count": len(g), "mean_p": mean_p, "accuracy": acc})
        if g:
            ece += len(g) / n * abs(acc - mean_p)
    return bins, (ece if n else None)


def verdict(mc_accuracy: float | None, position_bias_rate: float | None, ece: float | None = None) -> str:
    """One plain-language line on whether the labels carry signal.

    Near chance: MC accuracy within CHANCE_MARGIN of 0.5. Position-dominated: the same position
    wins both orders in more than POSITION_DOMINATED of the comparisons.
    """
    chance = mc_accuracy is not None and abs(mc_accuracy - 0.5) <= CHANCE_MARGIN
    inverted = mc_accuracy is not None and mc_accuracy < 0.5 - CHANCE_MARGIN
    positional = position_bias_rate is not None and position_bias_rate > POSITION_DOMINATED
    pos = f"same position wins both orders in {position_bias_rate:.0%} of comparisons" if position_bias_rate is not None else None
    problems = []
    if chance:
        problems.append(f"near chance (MC accuracy {mc_accuracy:.2f})")
    if inverted:
        problems.append(f"worse than chance (MC accuracy {mc_accuracy:.2f}: it prefers the wrong answers)")
    if positional:
        problems.append(f"position-dominated ({pos})")
    if problems:
        return f"labeler {' and '.join(problems)}: its preference labels carry little signal"
    parts = []
    if mc_accuracy is None:
        parts.append("no multiple-choice check (mc is empty), so its accuracy is unknown")
    else:
        parts.append(f"MC accuracy {mc_accuracy:.2f}" + (f", ECE {ece:.2f}" if ece is not None else ""))
    if pos:
        parts.append(pos)
    return "labeler " + "; ".join(parts)
