"""Cleaning of generated critiques and revisions (SL-CAI data quality).

Small models do not follow the critique -> revision pattern reliably (paper Section 3: the
revisions of small models are worse; our embedded 135M model often copies its critique into its
"revision"). Every generated text goes through `clean()`, which first repairs what can be repaired
and then names what is still wrong:

Repairs (the text is kept, the repair is counted):
- `label_stripped`: a leading template label such as "Revision:" or "Critique:" is removed;
- `debris_cut`: the text is cut where template debris starts (a role tag such as "Human:",
  "<|im_start|>", or a "CritiqueRequest"/"Revision Request" line): the model began to play the
  next turn of the pattern itself.

- `cut_to_sentence` (only with `cut_truncated`): a response or revision that hit `max_new_tokens`
  is cut after its last complete sentence, when that keeps at least `MIN_CUT_WORDS` words, instead of
  being dropped as truncated (a short complete answer teaches no mid-sentence stop; the cost is
  answers a little shorter than the model would write).

Problems (the stage retries the generation, then drops the round; see `stages/revise.py`):
- `empty`: nothing (or fewer than `MIN_WORDS` words) left;
- `truncated`: a revision or response that hit `max_new_tokens` (an SFT target that stops
  mid-sentence teaches the model to stop mid-sentence); a truncated critique is kept, since its
  first sentences still say what to change;
- `echo_request`: the text mostly repeats the critique or revision request;
- `echo_critique`: a revision that mostly repeats its critique, or talks about "the assistant's
  response" in the third person or opens with "The response ..." (a critique, not a rewritten answer);
- `echo_prompt`: a revision that mostly repeats the human's request;
- `echo_fewshot`: a critique or revision that copies a few-shot example (`copies_fewshot`: it shares
  a word `COPY_NGRAM`-gram with the few-shot block's texts, or mostly repeats them), e.g. "I can't
  help find her address." from the privacy example, in an answer about something else, or "Blocking
  you is a clear sign they wants space" with its pronouns changed.

"Mostly repeats" is `containment(text, source) >= ECHO_THRESHOLD`: the share of the text's word
trigrams (words for texts shorter than three words) that also occur in the source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MIN_WORDS = 2
ECHO_THRESHOLD = 0.5
# 6, not 8: the embedded model's near-copies swap a pronoun every few words ("I'm sorry, but I can't help
# find their address. Blocking you is a clear sign they wants space...", cpu_small's revise, 2026-12-02),
# which no 8-gram catches; at 5, generic refusal openings ("I'm sorry, but I can't ...") already match
# the evasive-refusal example (measured on the 35 accepted revisions of that run: 8 -> 0 flagged, 6 -> 1,
# the copy, 5 -> 4).
COPY_NGRAM = 6
MIN_CUT_WORDS = 12
_LAST_SENTENCE = re.compile(r"^(.*[.!?])(?:[\"')\]]*)\s", re.S)

_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:revision|revised response|critique|critique request|revision request|response|assistant|answer)"
    r"\s*(?:\*\*)?\s*:\s*(?:\*\*)?",
    re.IGNORECASE,
)
_DEBRIS = re.compile(
    r"(?:<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|(?:^|\n)\s*(?:Human|User|H)\s*:|"
    r"(?:^|\n)\s*(?:Assistant|A)\s*:|Critique\s?Request\s*:|Revision\s?Request\s*:|"
    r"(?:^|\n)\s*(?:Critique|Revision)\s*:)",
    re.IGNORECASE,
)
_THIRD_PERSON = re.compile(
    r"\bthe assistant'?s?\b(?:\s+(?:last|most recent|previous|original))?\s+response\b"
    r"|^\s*(?:the|this|that|your)\s+(?:(?:last|most recent|previous|original|initial)\s+)?(?:response|answer|reply)\b",
    re.IGNORECASE,
)

PROBLEMS = ("empty", "truncated", "echo_request", "echo_critique", "echo_prompt", "echo_fewshot")
REPAIRS = ("label_stripped", "debris_cut", "cut_to_sentence")


@dataclass
class Cleaned:
    text: str
    problem: str | None = None  # one of PROBLEMS, None when the text is usable
    repairs: list[str] = field(default_factory=list)  # REPAIRS applied


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def containment(text: str, source: str) -> float:
    """Share of `text`'s word trigrams (or words, for texts under three words) found in `source`."""
    t, s = words(text), words(source)
    n = 3 if len(t) >= 3 else 1
    grams = [tuple(t[i : i + n]) for i in range(len(t) - n + 1)]
    if not grams:
        return 0.0
    have = {tuple(s[i : i + n]) for i in range(len(s) - n + 1)}
    return sum(g in have for g in grams) / len(grams)


def shares_ngram(text: str, source: str, n: int = COPY_NGRAM) -> bool:
    """True when `text` and `source` have a word n-gram in common."""
    t, s = words(text), words(source)
    have = {tuple(s[i : i + n]) for i in range(len(s) - n + 1)}
    return any(tuple(t[i : i + n]) in have for i in range(len(t) - n + 1))


def copies_fewshot(text: str, fewshot: str) -> bool:
    """True when `text` copies the few-shot texts: a shared word COPY_NGRAM-gram, or mostly repeated."""
    return shares_ngram(text, fewshot) or containment(text, fewshot) >= ECHO_THRESHOLD


def repair(text: str) -> tuple[str, list[str]]:
    """Strip a leading label and cut at template debris. Returns (text, repairs applied)."""
    done: list[str] = []
    text = text.strip()
    stripped = _LABEL.sub("", text, count=1)
    if stripped != text:
        done.append("label_stripped")
        text = stripped.strip()
    m = _DEBRIS.search(text)
    if m:
        done.append("debris_cut")
        text = text[: m.start()].strip()
    return text, done


def cut_to_sentence(text: str) -> str | None:
    """`text` up to its last complete sentence (". ", "! ", "? " or a line break after one), or None
    when that leaves fewer than MIN_CUT_WORDS words."""
    m = _LAST_SENTENCE.match(text + " ")
    head = m.group(1).strip() if m else ""
    return head if len(words(head)) >= MIN_CUT_WORDS else None


def clean(text: str, truncated: bool = False, *, kind: str, requests: tuple[str, ...] = (), critique: str = "", prompt: str = "",
          fewshot: str = "", cut_truncated: bool = False) -> Cleaned:
    """Repair and check one generated text. kind: "critique", "revision", or "response" (a plain
    answer: only the empty and truncated checks apply). `fewshot`: the texts of the few-shot
    examples the generation saw (responses, critiques, revisions)."""
    if kind not in ("critique", "revision", "response"):
        raise ValueError(kind)
    fixed, repairs = repair(text)
    if truncated and cut_truncated and kind != "critique" and "debris_cut" not in repairs:
        head = cut_to_sentence(fixed)
        if head is not None:
            fixed, truncated = head, False
            repairs.append("cut_to_sentence")
    out = Cleaned(fixed, None, repairs)
    if len(words(fixed)) < MIN_WORDS:
        out.problem = "empty"
    elif truncated and kind != "critique" and "debris_cut" not in repairs:
        out.problem = "truncated"
    elif kind == "response":
        pass
    elif any(r and containment(fixed, r) >= ECHO_THRESHOLD for r in requests):
        out.problem = "echo_request"
    elif kind == "revision" and (
        (critique and containment(fixed, critique) >= ECHO_THRESHOLD) or _THIRD_PERSON.search(fixed)
    ):
        out.problem = "echo_critique"
    elif kind == "revision" and prompt and len(words(prompt)) >= 5 and containment(fixed, prompt) >= ECHO_THRESHOLD:
        out.problem = "echo_prompt"
    elif fewshot and copies_fewshot(fixed, fewshot):
        out.problem = "echo_fewshot"
    return out
