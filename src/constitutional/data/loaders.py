"""Loaders for prompt sets, conversations and multiple-choice evaluations.

Prompt sets: JSONL, JSON (a list), CSV, TXT (one prompt per line), Hugging Face datasets (a
`save_to_disk` directory, a directory of data files, or a hub id `hf:<id>[:<split>]` when online),
and the built-in sets `builtin:redteam` / `builtin:helpful`. A record's text comes from the first of
the fields `prompt, question, instruction, text, input, transcript, chosen`; a text in the
`\\n\\nHuman: ...\\n\\nAssistant: ...` transcript form is parsed into chat messages and the prompt is
the conversation up to the last human turn (for HH-RLHF style data, the human's request).

Every prompt gets a stable `id` (the record's own, else `<file stem>-<line>`) and a deterministic
train/test `split` from a hash of the id (a record's own `split` field wins).

Multiple-choice evaluations: the `{"prompt", "corrects", "incorrects"}` JSONL form and BIG-bench
`task.json` (`examples: [{input, target_scores}]`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constitution import builtin_path
from ..errors import UserError
from ..run import read_records

TEXT_FIELDS = ("prompt", "question", "instruction", "text", "input", "transcript", "chosen")
BUILTIN = {
    "redteam": "redteam_prompts.jsonl",
    "helpful": "helpful_prompts.jsonl",
    "benign": "benign_lookalike_prompts.jsonl",  # benign requests that only look harmful (over-refusal)
    "mc": "mc_comparisons.jsonl",
    "truthfulness": "truthfulness_mc.jsonl",  # misconception questions, two options
}
PROMPT_SETS = ("redteam", "helpful", "benign")
MC_SETS = ("mc", "truthfulness")

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant|H|A):[ \t]?", re.MULTILINE)


def split_of(record_id: str, test_fraction: float = 0.2) -> str:
    """Deterministic train/test split from a hash of the id (stable across machines and runs)."""
    h = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_fraction else "train"


def parse_transcript(text: str) -> list[dict]:
    """`"\\n\\nHuman: hi\\n\\nAssistant: hello"` -> [{"role": "user", ...}, {"role": "assistant", ...}].

    Returns [] when the text has no Human:/Assistant: turns.
    """
    matches = list(_TURN.finditer(text))
    if not matches or text[: matches[0].start()].strip():
        return []
    messages = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        content = text[m.end() : nxt.start() if nxt else len(text)].strip()
        role = "user" if m.group(1) in ("Human", "H") else "assistant"
        messages.append({"role": role, "content": content})
    return messages


def to_transcript(messages: list[dict]) -> str:
    """Chat messages -> the paper's `Human: ...\\n\\nAssistant: ...` form (system messages dropped)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages if m["role"] in names)


@dataclass
class Prompt:
    id: str
    prompt: str  # the human's last message
    messages: list[dict] = field(default_factory=list)  # the conversation, ending with the human turn
    category: str | None = None
    split: str = "train"

    def to_dict(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "messages": self.messages, "split": self.split}
        if self.category:
            d["category"] = self.category
        return d


def _record_to_prompt(rec: Any, default_id: str, where: str) -> Prompt | None:
    if isinstance(rec, str):
        rec = {"prompt": rec}
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected an object with a prompt field, got {type(rec).__name__}")
    messages = None
    if isinstance(rec.get("messages"), list):
        messages = [m for m in rec["messages"] if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")]
    else:
        key = next((k for k in TEXT_FIELDS if k in rec), None)
        if key is None:
            raise UserError(f"{where}: no prompt field; expected one of {', '.join(TEXT_FIELDS)} or messages")
        text = rec[key]
        if not isinstance(text, str):
            raise UserError(f"{where}: field {key!r} must be text, got {type(text).__name__}")
        parsed = parse_transcript(text)
        messages = parsed if parsed else [{"role": "user", "content": text.strip()}]
    # The prompt is the conversation up to and including the last human turn.
    while messages and messages[-1]["role"] != "user":
        messages = messages[:-1]
    if not messages or not messages[-1]["content"].strip():
        return None
    rid = str(rec.get("id", default_id))
    split = rec.get("split")
    split = str(split) if split in ("train", "test") else split_of(rid)
    category = rec.get("category")
    return Prompt(rid, messages[-1]["content"].strip(), messages, str(category) if category is not None else None, split)


def _read_records(path: Path) -> list[tuple[Any, str]]:
    """(record, location) pairs from a JSONL/JSON/CSV/TXT file."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if suffix == ".jsonl":
        return [(rec, f"{path}:{n}") for rec, n in read_records(path)]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the syntax") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
            if data is None:
                raise UserError(f"{path}: expected a list of prompts (or an object holding one)")
        return [(r, f"{path}[{i}]") for i, r in enumerate(data)]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames or not any(f in TEXT_FIELDS for f in reader.fieldnames):
            raise UserError(f"{path}: CSV header {reader.fieldnames} has no prompt column; name one of {', '.join(TEXT_FIELDS)}")
        return [(row, f"{path}:{i}") for i, row in enumerate(reader, 2)]
    if suffix in (".txt", ""):
        return [(line, f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    raise UserError(f"{path}: unsupported prompt file type {suffix!r}; use .jsonl, .json, .csv, .txt or a datasets directory")


def _read_hf(spec: str, path: Path | None) -> list[tuple[Any, str]]:
    try:
        import datasets
    except ImportError:
        raise UserError("reading Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    if path is not None:
        if (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
        name = str(path)
    else:
        hub = spec[len("hf:") :]
        hub_id, _, split = hub.partition(":")
        try:
            ds = datasets.load_dataset(hub_id, split=split or None)
        except Exception as e:  # offline, unknown id, gated ...
            raise UserError(f"{spec}: could not load the dataset from the hub ({type(e).__name__}); check the id and your network, or pass a local file") from None
        name = spec
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    return [(row, f"{name}[{i}]") for i, row in enumerate(ds)]


def load_prompts(spec: str | Path, limit: int | None = None, split: str | None = None) -> list[Prompt]:
    """Load a prompt set. `split` in {None, "train", "test"} filters by the deterministic split."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in PROMPT_SETS:
            raise UserError(f"{spec}: unknown built-in prompt set; use one of " + ", ".join(f"builtin:{k}" for k in PROMPT_SETS))
        path: Path | None = builtin_path(BUILTIN[key])
        rows = _read_records(path)
        stem = key
    elif spec.startswith("hf:"):
        rows, stem, path = _read_hf(spec, None), spec[3:].replace("/", "_"), None
    else:
        path = Path(spec)
        if path.is_dir():
            rows = _read_hf(spec, path)
        elif path.is_file():
            rows = _read_records(path)
        else:
            raise UserError(f"{spec}: prompt file not found; check the path (or use builtin:redteam / builtin:helpful)")
        stem = path.stem
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for i, (rec, where) in enumerate(rows):
        p = _record_to_prompt(rec, f"{stem}-{i:05d}", where)
        if p is None:
            continue
        if p.id in seen:
            raise UserError(f"{where}: duplicate id {p.id!r} (first at {seen[p.id]}); ids must be unique")
        seen[p.id] = where
        prompts.append(p)
    if split is not None:
        prompts = [p for p in prompts if p.split == split]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise UserError(f"{spec}: no prompts found{f' in split {split!r}' if split else ''}; the prompt set is empty")
    return prompts


@dataclass
class MCItem:
    """A multiple-choice item: `prompt` followed by one of `options`; `correct` indexes the right ones."""

    id: str
    prompt: str
    options: list[str]
    correct: list[int]
    subset: str | None = None
    meta: dict = field(default_factory=dict)


def load_mc(spec: str | Path) -> list[MCItem]:
    """Load a multiple-choice eval: `builtin:mc` / `builtin:truthfulness`, a `{"prompt","corrects","incorrects"}` JSONL, or BIG-bench task.json."""
    spec = str(spec)
    key = spec.split(":", 1)[1] if spec.startswith("builtin:") else None
    if key is not None and key not in MC_SETS:
        raise UserError(f"{spec}: unknown built-in multiple-choice set; use one of " + ", ".join(f"builtin:{k}" for k in MC_SETS))
    path = builtin_path(BUILTIN[key]) if key else Path(spec)
    if path.is_dir():
        path = path / "task.json"
    if not path.is_file():
        raise UserError(f"{spec}: multiple-choice file not found; check the path (or use builtin:mc)")
    items: list[MCItem] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the syntax") from None
        examples = data.get("examples") if isinstance(data, dict) else None
        if not isinstance(examples, list):
            raise UserError(f"{path}: expected a BIG-bench task with an 'examples' list")
        prefix = data.get("example_input_prefix", "")
        suffix = data.get("example_output_prefix", " ")
        for i, ex in enumerate(examples):
            where = f"{path}: examples[{i}]"
            if not isinstance(ex, dict) or "input" not in ex or not isinstance(ex.get("target_scores"), dict):
                raise UserError(f"{where}: expected input and target_scores")
            opts = list(ex["target_scores"])
            scores = [float(ex["target_scores"][o]) for o in opts]
            best = max(scores)
            items.append(MCItem(f"{path.parent.name}-{i:04d}", prefix + ex["input"], [suffix + o for o in opts], [j for j, s in enumerate(scores) if s == best]))
    else:
        for rec, where in _read_records(path):
            if not isinstance(rec, dict) or not {"prompt", "corrects", "incorrects"} <= set(rec):
                raise UserError(f"{where}: expected fields prompt, corrects, incorrects")
            corrects, incorrects = rec["corrects"], rec["incorrects"]
            if not isinstance(corrects, list) or not isinstance(incorrects, list) or not corrects or not incorrects:
                raise UserError(f"{where}: corrects and incorrects must be non-empty lists of option strings")
            options = [str(o) for o in corrects + incorrects]
            meta = {k: v for k, v in rec.items() if k not in ("id", "prompt", "corrects", "incorrects", "subset")}
            items.append(MCItem(str(rec.get("id", f"{path.stem}-{len(items):04d}")), rec["prompt"], options, list(range(len(corrects))), rec.get("subset"), meta))
    if not items:
        raise UserError(f"{spec}: no multiple-choice items found")
    return items
