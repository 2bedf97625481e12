"""Constitutions: the principles that steer critique/revision (SL-CAI) and AI feedback (RL-CAI).

Paper: Bai et al. 2022, "Constitutional AI", Sections 3.1 (critique -> revision, a principle drawn at
random for each step) and 4.1 (multiple-choice feedback, a principle drawn at random for each
comparison). Two kinds of principle:

- `CritiquePrinciple(id, critique, revision)`: a critique request and the matching revision request.
- `FeedbackPrinciple(id, text)`: a comparison question shown above the options (A)/(B).

Formats read: the project's YAML (`data/constitution.yaml`), and the paper's JSON forms:
critique/revision instructions `{"name": {"prompt": [critique request, ...], "edit_request": ...}}`
and feedback principles as a JSON list of strings. Few-shot examples: the project's YAML lists,
or JSON lists (of the same objects, or of raw text blocks used verbatim).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import load_yaml
from .errors import UserError


@dataclass(frozen=True)
class CritiquePrinciple:
    id: str
    critique: str  # the critique request, e.g. "Identify specific ways in which ... is harmful"
    revision: str  # the revision request, e.g. "Please rewrite the response to remove ..."
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeedbackPrinciple:
    id: str
    text: str  # e.g. "Which of these assistant responses is less harmful? Choose the response ..."
    topics: tuple[str, ...] = ()


@dataclass
class Constitution:
    name: str
    critique_revision: list[CritiquePrinciple] = field(default_factory=list)
    feedback: list[FeedbackPrinciple] = field(default_factory=list)
    source: str = ""

    def sample_critique(self, rng: random.Random) -> CritiquePrinciple:
        """Draw one critique/revision principle uniformly at random (paper Section 3.1)."""
        if not self.critique_revision:
            raise UserError(f"constitution {self.source or self.name}: no critique/revision principles; add some under critique_revision")
        return rng.choice(self.critique_revision)

    def sample_feedback(self, rng: random.Random) -> FeedbackPrinciple:
        """Draw one feedback principle uniformly at random (paper Section 4.1)."""
        if not self.feedback:
            raise UserError(f"constitution {self.source or self.name}: no feedback principles; add some under feedback")
        return rng.choice(self.feedback)

    def critique_by_id(self, pid: str) -> CritiquePrinciple:
        for p in self.critique_revision:
            if p.id == pid:
                return p
        raise KeyError(pid)

    def feedback_by_id(self, pid: str) -> FeedbackPrinciple:
        for p in self.feedback:
            if p.id == pid:
                return p
        raise KeyError(pid)


def builtin_path(name: str) -> Path:
    """Path of a file shipped in `constitutional/data`."""
    return Path(str(resources.files("constitutional") / "data" / name))


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: file not found; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the syntax") from None


def _read(path: Path) -> Any:
    return _read_json(path) if path.suffix.lower() == ".json" else load_yaml(path)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected non-empty text, got {value!r}")
    return value.strip()


def _check_unique(ids: list[str], where: str) -> None:
    seen = set()
    for pid in ids:
        if pid in seen:
            raise UserError(f"{where}: duplicate principle id {pid!r}; ids must be unique")
        seen.add(pid)


def _critiques_from_paper_json(data: dict, src: str) -> list[CritiquePrinciple]:
    out = []
    for name, entry in data.items():
        where = f"{src} ({name})"
        if not isinstance(entry, dict) or "prompt" not in entry or "edit_request" not in entry:
            raise UserError(f"{where}: expected {{\"prompt\": [...], \"edit_request\": ...}}")
        prompts = entry["prompt"] if isinstance(entry["prompt"], list) else [entry["prompt"]]
        revision = _text(entry["edit_request"], f"{where}: edit_request")
        for i, p in enumerate(prompts):
            pid = name if len(prompts) == 1 else f"{name}.{i}"
            out.append(CritiquePrinciple(pid, _text(p, f"{where}: prompt[{i}]"), revision))
    return out


def _feedback_from_list(data: list, src: str) -> list[FeedbackPrinciple]:
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(FeedbackPrinciple(f"feedback-{i:02d}", _text(item, f"{src}[{i}]")))
        elif isinstance(item, dict):
            out.append(_feedback_entry(item, f"{src}: feedback[{i}]"))
        else:
            raise UserError(f"{src}[{i}]: expected a principle string, got {item!r}")
    return out


def _feedback_entry(item: Any, where: str) -> FeedbackPrinciple:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a mapping with id and text")
    for key in ("id", "text"):
        if key not in item:
            raise UserError(f"{where}: missing field {key!r}")
    return FeedbackPrinciple(str(item["id"]), _text(item["text"], f"{where}.text"), tuple(item.get("topics") or ()))


def _critique_entry(item: Any, where: str) -> CritiquePrinciple:
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a mapping with id, critique and revision")
    for key in ("id", "critique", "revision"):
        if key not in item:
            raise UserError(f"{where}: missing field {key!r}")
    return CritiquePrinciple(
        str(item["id"]),
        _text(item["critique"], f"{where}.critique"),
        _text(item["revision"], f"{where}.revision"),
        tuple(item.get("topics") or ()),
    )


def load_constitution(path: str | Path | None = None, feedback_path: str | Path | None = None) -> Constitution:
    """Load a constitution. `None` or "default" is the built-in one.

    `path`: project YAML (critique_revision + feedback), or the paper's critique/revision JSON.
    `feedback_path`: optional file whose feedback principles replace those of `path`
    (the paper's JSON list of strings, or a YAML list).
    """
    if path in (None, "", "default"):
        path = builtin_path("constitution.yaml")
    path = Path(path)
    data = _read(path)
    src = str(path)
    if isinstance(data, dict) and ("critique_revision" in data or "feedback" in data):
        unknown = set(data) - {"name", "version", "description", "critique_revision", "feedback"}
        if unknown:
            raise UserError(f"{src}: unknown key {sorted(unknown)[0]!r}; expected name, description, critique_revision, feedback")
        crit_raw = data.get("critique_revision") or []
        fb_raw = data.get("feedback") or []
        if not isinstance(crit_raw, list) or not isinstance(fb_raw, list):
            raise UserError(f"{src}: critique_revision and feedback must be lists")
        critiques = [_critique_entry(x, f"{src}: critique_revision[{i}]") for i, x in enumerate(crit_raw)]
        feedback = [_feedback_entry(x, f"{src}: feedback[{i}]") for i, x in enumerate(fb_raw)]
        name = str(data.get("name") or path.stem)
    elif isinstance(data, dict):
        critiques, feedback, name = _critiques_from_paper_json(data, src), [], path.stem
    elif isinstance(data, list):
        critiques, feedback, name = [], _feedback_from_list(data, src), path.stem
    else:
        raise UserError(f"{src}: not a constitution (expected a mapping with critique_revision/feedback, the paper's critique JSON, or a list of feedback principles)")
    if feedback_path not in (None, ""):
        fdata = _read(Path(feedback_path))
        if not isinstance(fdata, list):
            raise UserError(f"{feedback_path}: expected a list of feedback principles")
        feedback = _feedback_from_list(fdata, str(feedback_path))
        src += f" + {feedback_path}"
    if not critiques and not feedback:
        raise UserError(f"{src}: the constitution has no principles; add critique_revision or feedback entries")
    _check_unique([p.id for p in critiques], f"{src}: critique_revision")
    _check_unique([p.id for p in feedback], f"{src}: feedback")
    return Constitution(name=name, critique_revision=critiques, feedback=feedback, source=src)


CRITIQUE_FEWSHOT_FIELDS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")
FEEDBACK_FEWSHOT_FIELDS = ("conversation", "principle", "options", "answer")


def load_fewshot(path: str | Path | None, kind: str) -> list[dict | str]:
    """Few-shot examples for `kind` in {"critique", "feedback"}.

    Each entry is a dict with the fields of the built-in YAML, or a raw text block (the paper's
    JSON lists of prompt strings), which is used verbatim.
    """
    if kind not in ("critique", "feedback"):
        raise ValueError(kind)
    if path in (None, "", "default"):
        path = builtin_path(f"fewshot_{kind}.yaml")
    path = Path(path)
    data = _read(path)
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a list of few-shot examples")
    fields = CRITIQUE_FEWSHOT_FIELDS if kind == "critique" else FEEDBACK_FEWSHOT_FIELDS
    out: list[dict | str] = []
    for i, ex in enumerate(data):
        if isinstance(ex, str):
            out.append(ex)
            continue
        if not isinstance(ex, dict):
            raise UserError(f"{path}[{i}]: expected a mapping or a text block")
        missing = [f for f in fields if f not in ex]
        if missing:
            raise UserError(f"{path}[{i}]: missing field {missing[0]!r}; few-shot {kind} examples need {', '.join(fields)}")
        if kind == "feedback":
            if not isinstance(ex["options"], list) or len(ex["options"]) < 2:
                raise UserError(f"{path}[{i}]: options must be a list of at least two responses")
            letters = [chr(ord("A") + j) for j in range(len(ex["options"]))]
            if str(ex["answer"]).strip() not in letters:
                raise UserError(f"{path}[{i}]: answer {ex['answer']!r} must be one of {letters}")
        out.append(ex)
    return out
