"""Best-of-n revisions: pick the candidate that a harmlessness guideline makes most likely.

The paper's labeler (Section 4.1) asks the feedback model a multiple-choice question and reads the
log-probabilities of "(A)" and "(B)"; at 135M that is at chance and dominated by position (see
`cai label`'s verdict). Small models are better at *likelihoods* than at answering letters, so the
selector of `cai revise --set revision_samples=n` scores each candidate y by how much a guideline
raises its probability:

    score(y) = log p(y | G, x) - log p(y | x),

where x is the human's conversation, G the guideline put before the human's first message (in the
turn itself, not a system message, so that templates without a system role and plain transcripts
keep it), and both terms are the same model's summed token log-probabilities (a pointwise mutual
information between the answer and the guideline). No letters and no positions: nothing for a
position bias to act on.

The guideline is `HARMLESS`, this project's one-sentence harmlessness principle, not the drawn
critique principle's revision request. Measured on the labelled comparisons of builtin:mc
(`benchmarks/bench_selector.py` and the session note; embedded model, float32): on the 24 harmless
pairs HARMLESS picks the harmless response in 22 (Wilson 95% interval 74-98%); the drawn
principle's revision request ("Rewrite the assistant's response so that it no longer contains
anything harmful...") in 16 (47-82%, not distinguishable from chance), the two together in 18; the
paper's multiple-choice labeler in 54% (35-72%) and the plain likelihood log p(y | x) in 0 of 24
(it prefers the compliant answer every time). Why it is fair: the comparisons it was checked on
are never trained on, and the behaviour evaluation judges with a different instrument (the
refusal classifier on held-out prompts). What it is not: a helpfulness judge (it prefers
declining: on the 24 helpful pairs, where the better answer is the one that helps instead of refusing,
it is right in only 21%); it only chooses among revisions of answers to red-team prompts.
"""

from __future__ import annotations

from typing import Sequence

GUIDE = "When you answer, follow this guideline: {principle}"
HARMLESS = ("You are a careful assistant. Never help with anything harmful, unethical, dangerous or illegal; decline such "
            "requests politely and suggest a safer alternative.")


def guided(messages: list[dict], guideline: str) -> list[dict]:
    """The conversation with `guideline` before the human's first message."""
    out, done = [], False
    for m in messages:
        if m["role"] == "user" and not done:
            m, done = {**m, "content": guideline.strip() + "\n\n" + m["content"]}, True
        out.append(m)
    return out


def pmi_scores(backend, messages: list[dict], candidates: Sequence[str], guideline: str = HARMLESS) -> list[float]:
    """score(y) for each candidate y (module docstring): one scoring call of 2 x len(candidates) pairs."""
    plain = list(messages)
    prompts = [backend.render_chat(guided(plain, guideline))] * len(candidates) + [backend.render_chat(plain)] * len(candidates)
    lp = backend.sequence_logprobs(prompts, list(candidates) * 2)
    n = len(candidates)
    return [lp[i] - lp[n + i] for i in range(n)]


def pick(scores: Sequence[float]) -> int:
    """The index of the best score (the first on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
