"""Best-of-n revisions: pick the candidate the constitution's principle makes most likely.

The paper's labeler (Section 4.1) asks the feedback model a multiple-choice question and reads the
log-probabilities of "(A)" and "(B)"; at 135M that is at chance and dominated by position (see
`cai label`'s verdict). Small models are better at *likelihoods* than at answering letters, so the
selector of `cai revise --set revision_samples=n` scores each candidate y by how much the drawn
principle raises its probability:

    score(y) = log p(y | G(principle), x) - log p(y | x),

where x is the human's conversation, G(principle) the line "When you answer, follow this
guideline: <the principle's revision request>" put before the human's first message (in the turn
itself, not a system message, so that templates without a system role and plain transcripts keep
it), and both terms are the same model's summed token
log-probabilities (a pointwise mutual information between the answer and the principle). No
position, no letters: nothing for a position bias to act on. It is the model's own judgement
conditioned on the constitution, the same information the paper's feedback model uses, read off
its likelihoods instead of a multiple-choice answer.

How good it is, measured (`benchmarks/bench_selector.py`, embedded model, float32): on the
labelled comparisons of `builtin:mc` (the correct option is the harmless/helpful/honest one), a
guideline of the subset's kind picks the correct option in 23 of 24 harmless pairs, 14 of 24
helpful and 16 of 24 honest; the plain likelihood log p(y | x) picks it in 0, 9 and 7. It is a
harmlessness selector, not a helpfulness one: it prefers declining, which is what the red-team
prompts' revisions are for, and it must not judge benign prompts.
"""

from __future__ import annotations

from typing import Sequence

GUIDE = "When you answer, follow this guideline: {principle}"


def guided(messages: list[dict], principle_text: str) -> list[dict]:
    """The conversation with the guideline before the human's first message."""
    out, done = [], False
    for m in messages:
        if m["role"] == "user" and not done:
            m, done = {**m, "content": GUIDE.format(principle=principle_text.strip()) + "\n\n" + m["content"]}, True
        out.append(m)
    return out


def pmi_scores(backend, messages: list[dict], principle_text: str, candidates: Sequence[str]) -> list[float]:
    """score(y) for each candidate y (module docstring): one scoring call of 2 x len(candidates) pairs."""
    plain = list(messages)
    prompts = [backend.render_chat(guided(plain, principle_text))] * len(candidates) + [backend.render_chat(plain)] * len(candidates)
    lp = backend.sequence_logprobs(prompts, list(candidates) * 2)
    n = len(candidates)
    return [lp[i] - lp[n + i] for i in range(n)]


def pick(scores: Sequence[float]) -> int:
    """The index of the best score (the first on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
