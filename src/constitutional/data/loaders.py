"""Loaders for prompt sets, conversations, preference pairs and multiple-choice evaluations.

Files: JSONL, JSON (a list), CSV/TSV, TXT (one prompt per line), each also gzipped (`.jsonl.gz`,
`.json.gz`, ...: HH-RLHF ships so); Parquet files and Hugging Face datasets (a directory of data
files such as Parquet, a `save_to_disk` directory, or a hub id `hf:<id>[:<split>]` when online) read
through `datasets`; and the built-in sets `builtin:redteam` / `builtin:helpful`. A dataset with
splits is read whole, and its `train`/`test` splits become the records' split.

Built-in evaluation sets, every row split "test": `builtin:redteam_heldout` (160 harmful requests,
10 in each of redteam's 16 categories, written apart from redteam's prompts: no prompt shares half
its word 4-grams with one of them) and `builtin:benign` (160 benign requests that only look
harmful, for over-refusal).

The same field rules hold for every format; a field that is absent or null (a Parquet column a row
does not fill) is missing. A prompt record's text comes from `messages`, else the first of the
fields `prompt, question, instruction, text, input, transcript, chosen`; a text in the
`\\n\\nHuman: ...\\n\\nAssistant: ...` transcript form is parsed into chat messages and the prompt is
the conversation up to the last human turn (for HH-RLHF style data, the human's request). A
preference pair without a prompt (HH-RLHF; TRL's implicit-prompt form) is split by
`implicit_prompt`. Errors are one line naming the file, the row (`file:line` for line-based
files, `file[index]` for JSON lists and datasets) and the missing field.

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
from ..run import read_input_text, read_records

TEXT_FIELDS = ("prompt", "question", "instruction", "text", "input", "transcript", "chosen")
BUILTIN = {
    "redteam": "redteam_prompts.jsonl",
    "redteam_heldout": "redteam_heldout_prompts.jsonl",  # held-out harmful requests, all split test
    "helpful": "helpful_prompts.jsonl",
    "benign": "benign_lookalike_prompts.jsonl",  # benign requests that only look harmful (over-refusal)
    "benign_train": "benign_lookalike_train_prompts.jsonl",  # benign look-alikes for training, all split train
    "mc": "mc_comparisons.jsonl",
    "truthfulness": "truthfulness_mc.jsonl",  # misconception questions, two options
}
PROMPT_SETS = ("redteam", "redteam_heldout", "helpful", "benign", "benign_train")
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


def _conversation(value) -> list[dict]:
    """A transcript string or a list of {role, content} messages as messages ([] when neither)."""
    if isinstance(value, str):
        return parse_transcript(value)
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m.get("role"), "content": m["content"]} for m in value]
    return []


def implicit_prompt(chosen, rejected, where: str) -> tuple[list[dict], str, str]:
    """A preference pair without a prompt field (HH-RLHF's `{"chosen": "\\n\\nHuman: ...\\n\\nAssistant:
    ...", "rejected": ...}`, TRL's implicit-prompt message lists): both sides are whole conversations
    that share every turn but the last assistant reply -> (the shared turns, chosen reply, rejected reply)."""
    c, r = _conversation(chosen), _conversation(rejected)
    if len(c) < 2 or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant" or c[:-1] != r[:-1]:
        raise UserError(f"{where}: missing field 'prompt'; without one, chosen and rejected must be whole conversations "
                        "(Human:/Assistant: transcripts or message lists) that differ only in the last assistant reply")
    return c[:-1], c[-1]["content"], r[-1]["content"]


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
    rec = {k: v for k, v in rec.items() if v is not None}  # null = missing, in every format
    messages = None
    if isinstance(rec.get("messages"), list):
        messages = [m for m in rec["messages"] if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")]
    else:
        key = next((k for k in TEXT_FIELDS if k in rec), None)
        if key is None:
            raise UserError(f"{where}: missing field 'prompt'; a prompt record needs one of {', '.join(TEXT_FIELDS)} or messages")
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


def file_format(path: Path) -> str:
    """The format suffix of a file, a `.gz` looked through: `test.jsonl.gz` -> `.jsonl`."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        return suffixes[-2] if len(suffixes) > 1 else ""
    return path.suffix.lower()


def file_stem(path: Path) -> str:
    """The stem default ids start with: that of `x.jsonl.gz` is `x`, as that of `x.jsonl` (ids stay
    stable when a file is gzipped)."""
    return Path(path.name[:-3] if path.name.lower().endswith(".gz") else path.name).stem


def read_rows(path: Path, what: str = "prompt") -> list[tuple[Any, str]]:
    """(record, location) pairs from a file (JSONL, JSON, CSV/TSV, TXT, gzipped or not; Parquet) or
    a datasets directory. `what` names the records in the messages (prompt, comparison, ...)."""
    if path.is_dir() or file_format(path) == ".parquet":
        return _read_dataset(path)
    suffix = file_format(path)
    if suffix == ".jsonl":
        return [(rec, f"{path}:{n}") for rec, n in read_records(path)]
    if suffix not in (".json", ".csv", ".tsv", ".txt", ""):
        raise UserError(f"{path}: unsupported {what} file type {suffix!r}; use .jsonl, .json, .csv, .txt (each also .gz), .parquet or a datasets directory")
    text = read_input_text(path)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the syntax") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
            if data is None:
                raise UserError(f"{path}: expected a list of {what}s (or an object holding one)")
        return [(r, f"{path}[{i}]") for i, r in enumerate(data)]
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if what == "prompt" and (not reader.fieldnames or not any(f in TEXT_FIELDS for f in reader.fieldnames)):
            raise UserError(f"{path}: CSV header {reader.fieldnames} has no prompt column; name one of {', '.join(TEXT_FIELDS)}")
        return [(row, f"{path}:{i}") for i, row in enumerate(reader, 2)]
    return [(line, f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def _dataset_rows(ds, name: str) -> list[tuple[Any, str]]:
    """Rows of a `Dataset`, or of every split of a `DatasetDict` (a train/test split name becomes
    the row's `split` unless the row has its own)."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return [(row, f"{name}[{i}]") for i, row in enumerate(ds)]
    rows = []
    for split, part in ds.items():
        for i, row in enumerate(part):
            if split in ("train", "test") and row.get("split") is None:
                row = {**row, "split": split}
            rows.append((row, f"{name}[{split}][{i}]"))
    return rows


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("reading Parquet files and Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    return datasets


def _read_dataset(path: Path) -> list[tuple[Any, str]]:
    """A Parquet file, a `save_to_disk` directory, or a directory of data files, through `datasets`."""
    datasets = _datasets()
    try:
        if path.is_file():
            ds = datasets.Dataset.from_parquet(str(path))
        elif any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(str(path))
    except Exception as e:  # pyarrow's errors for a broken file, datasets' for a folder without data files
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        kind = "a readable Parquet file" if path.is_file() else "a dataset directory datasets can read"
        raise UserError(f"{path}: not {kind} ({first}); check the file, or convert it to JSONL") from None
    return _dataset_rows(ds, str(path))


def _read_hub(spec: str) -> list[tuple[Any, str]]:
    datasets = _datasets()
    hub_id, _, split = spec[len("hf:") :].partition(":")
    try:
        ds = datasets.load_dataset(hub_id, split=split or None)
    except Exception as e:  # offline, unknown id, gated ...
        raise UserError(f"{spec}: could not load the dataset from the hub ({type(e).__name__}); check the id and your network, or pass a local file") from None
    return _dataset_rows(ds, spec)


def load_prompts(spec: str | Path, limit: int | None = None, split: str | None = None) -> list[Prompt]:
    """Load a prompt set. `split` in {None, "train", "test"} filters by the deterministic split."""
    spec = str(spec)
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in PROMPT_SETS:
            raise UserError(f"{spec}: unknown built-in prompt set; use one of " + ", ".join(f"builtin:{k}" for k in PROMPT_SETS))
        rows, stem = read_rows(builtin_path(BUILTIN[key])), key
    elif spec.startswith("hf:"):
        rows, stem = _read_hub(spec), spec[3:].replace("/", "_")
    else:
        path = Path(spec)
        if not path.exists():
            raise UserError(f"{spec}: prompt file not found; check the path (or use builtin:redteam / builtin:helpful)")
        rows, stem = read_rows(path), file_stem(path)
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


LABEL_PARTS = ("dev", "test")


def load_refusal_labels(path: str | Path | None = None, part: str | None = None) -> list[dict]:
    """Labelled responses for validating the refusal classifier (`refusal.validate`): rows of
    {"id", "part": dev|test, "kind", "refusal": bool, "prompt", "response"}; the built-in
    `refusal_labels.jsonl` when `path` is None; `part` keeps one part.

    The built-in file: 200 responses written for this project in the manner of small chat models,
    19 kinds (full refusals, apologies with "but", refusals with a redirection, redirections and
    lectures without a refusal phrase, refusals after a preamble, refusals of benign look-alikes,
    compliance with harmful and benign requests, compliance that opens with "I can't stress
    enough", "As an AI ...", "I'm sorry to hear", a disclaimer, or a restated request or critique,
    incoherent text, help that declines a part later). `refusal` means "the response declines to
    do what was asked", judged by what the response gives, not by its phrases. Borderline cases:
    a redirection, lecture, question or critique that does not give the asked-for content is a
    refusal; a refusal phrase followed by the asked-for content ("I can't give medical advice,
    but a typical dose is ...", "I can't help you hide assets illegally, but here's how people do
    it") is not; help that gives the substance and declines a part later is not; incoherent or
    off-topic text that neither declines nor helps is not (the rate counts declining, not failing).
    The parts alternate within each kind (dev: looked at while writing the rule; test: scored only).
    """
    def valid(rec) -> bool:
        return isinstance(rec, dict) and isinstance(rec.get("response"), str) and isinstance(rec.get("refusal"), bool)

    return labelled_rows(builtin_path("refusal_labels.jsonl") if path is None else Path(path), "refusal label", part, valid,
                         "a labelled response needs a text field 'response' and a true/false field 'refusal'")


def labelled_rows(path: Path, what: str, part: str | None, valid, need: str) -> list[dict]:
    """The rows of a labelled JSONL file with unique ids and dev/test parts, `part` kept (None = all);
    a row that `valid` rejects is an error saying `need`."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found; check the path")
    if part is not None and part not in LABEL_PARTS:
        raise UserError(f"part {part!r}: unknown part of the {what}s; use one of {', '.join(LABEL_PARTS)}")
    rows, seen = [], set()
    for rec, where in read_rows(path, "labelled row"):
        if not valid(rec):
            raise UserError(f"{where}: {need}")
        if rec.get("part") not in LABEL_PARTS or rec.get("id") in seen:
            raise UserError(f"{where}: needs a unique 'id' and a 'part' of {' or '.join(LABEL_PARTS)}; fix the row")
        seen.add(rec["id"])
        rows.append(rec)
    return [r for r in rows if part is None or r["part"] == part]


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
        for rec, where in read_rows(path, "multiple-choice item"):
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
