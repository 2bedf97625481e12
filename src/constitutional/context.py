"""Dialogue prompting: a context C in front of every conversation, and the "prompted model".

Seeds: "Dialogue Prompting for Alignment" (condition the model on C: p(y | C, x)) and "Dialogue
prompting versus Fine-Tuning on Instructions/Context"; paper: Askell et al. 2021 (arXiv 2112.00861),
its HHH prompt and Figure 2's "prompted" bar. A context is instructions plus example exchanges between a
human and a helpful, honest, harmless assistant. The built-in one is `data/hhh_context.yaml`
(written for this project, ~1,450 tokens with SmolLM2's tokenizer); users give their own as

- YAML or JSON: `{name?, instructions: str, examples: [dialogue, ...]}`, a dialogue being a
  `Human: ... \\n\\nAssistant: ...` transcript or a list of `{role: user|assistant, content}` messages;
- TXT, the paper's form: instructions, then the dialogues as transcripts, separated by lines of
  dashes (`-----`), which is also what `Context.text()` writes.

How C is placed (`backends/prompted.py`'s `PromptedBackend`, model string `prompted:<model>` / `prompted:<context>#<model>`):

- Chat conversations (`generate`, `render_chat`): C's instructions become the system message and
  its examples earlier user/assistant turns, followed by the conversation. Examples as real turns
  are demonstrations in the model's own chat format, which a chat model imitates; the same text
  pasted into the system message would be a document about other conversations. A conversation
  that brings its own system message keeps it, after C's instructions in the one system message.
- The chat template's default system prompt: SmolLM2's template injects "You are a helpful AI
  assistant named SmolLM, trained by Hugging Face" only when no system message is given. The
  prompted model always gives one (C's instructions), so the default is replaced by C, as the
  paper's prompt was the whole preamble of the model's input. The plain model (and so the student
  of context distillation, and the distilled model at inference) keeps the template's default:
  that is how the `hf` backend prompts every model, so distillation trains the student on exactly
  the input it is later served. A context without instructions adds no system message, and the
  default then stays in front of C's examples.
- Backends whose chat rendering drops system messages (a model without a chat template, rendered
  in the transcript form): the instructions are put at the start of the first human turn instead.
- Raw-text prompts (`option_logprobs`, `sequence_logprobs`, e.g. multiple-choice items): C's
  text form (the instructions and each dialogue, each followed by a `-----` line) is put in front
  of the prompt, as the paper put its prompt in front of the HHH evaluation text.

C is the same for every request, so the `hf` backend's shared-prefix KV cache encodes it once per
call of two or more requests. Departure: the built-in C is our own text, 9 dialogues and
~1,450 tokens, sized for small models and CPUs; the paper's prompt was several times longer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .backends.base import Conversation, Message, as_messages
from .config import load_yaml
from .constitution import builtin_path
from .data.loaders import parse_transcript, to_transcript
from .errors import UserError

BUILTIN = "builtin"
SEPARATOR = "-----"
_SEPARATOR_LINE = re.compile(r"^\s*-{3,}\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Context:
    """A context C: `instructions` and `examples` (dialogues of alternating user/assistant turns)."""

    name: str
    source: str  # "builtin" or the file it came from
    instructions: str
    examples: tuple[tuple[tuple[str, str], ...], ...]  # dialogue -> turns -> (role, content)

    def messages(self) -> list[Message]:
        """C as chat messages: a system message with the instructions (if any), then the examples."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return out + [{"role": r, "content": c} for dialogue in self.examples for r, c in dialogue]

    def text(self) -> str:
        """C in raw-text (transcript) form, ending with a separator line and a blank line, ready to
        be followed by a prompt; also the TXT file format that `load_context` reads."""
        blocks = ([self.instructions] if self.instructions else []) + [
            to_transcript([{"role": r, "content": c} for r, c in dialogue]) for dialogue in self.examples
        ]
        return "".join(f"{b}\n\n{SEPARATOR}\n\n" for b in blocks)

    def apply(self, conversation: Conversation, system_kept: bool = True) -> list[Message]:
        """The conversation with C in front (see the module docstring); `system_kept=False` for a
        renderer that drops system messages: the instructions open the first human turn."""
        messages = as_messages(conversation)
        own_system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        system = "\n\n".join(s for s in [self.instructions, *own_system] if s)
        turns = [{"role": r, "content": c} for dialogue in self.examples for r, c in dialogue] + rest
        if not system_kept and system:
            first = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
            if first is not None:
                turns[first] = {"role": "user", "content": f"{system}\n\n{turns[first]['content']}"}
                return turns
        return ([{"role": "system", "content": system}] if system else []) + turns


def _dialogue(value, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        messages = parse_transcript(value.strip())
        if not messages:
            raise UserError(f"{where}: expected a transcript starting with 'Human:' (turns 'Human: ...' and 'Assistant: ...')")
    elif isinstance(value, list) and all(isinstance(m, dict) for m in value):
        messages = value
    else:
        raise UserError(f"{where}: a dialogue is a 'Human: ... Assistant: ...' transcript or a list of {{role, content}} messages")
    turns = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("user", "assistant") or not isinstance(content, str) or not content.strip():
            raise UserError(f"{where}, turn {i + 1}: expected role user or assistant and non-empty text content")
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise UserError(f"{where}, turn {i + 1}: turns must alternate human, assistant, human, ... starting with the human")
        turns.append((role, content.strip()))
    if not turns or turns[-1][0] != "assistant":
        raise UserError(f"{where}: a dialogue must end with an assistant turn (it is an example of the assistant's behaviour)")
    return tuple(turns)


def _from_mapping(data, path: Path) -> Context:
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with instructions and examples")
    unknown = sorted(set(data) - {"name", "instructions", "examples"})
    if unknown:
        raise UserError(f"{path}: unknown field {unknown[0]!r}; a context has name, instructions and examples")
    instructions = data.get("instructions") or ""
    examples = data.get("examples") or []
    if not isinstance(instructions, str):
        raise UserError(f"{path} (instructions): expected text")
    if not isinstance(examples, list):
        raise UserError(f"{path} (examples): expected a list of dialogues")
    dialogues = tuple(_dialogue(d, f"{path} (examples[{i}])") for i, d in enumerate(examples))
    return Context(str(data.get("name") or path.stem), str(path), instructions.strip(), dialogues)


def _from_text(text: str, path: Path) -> Context:
    blocks = [b.strip() for b in _SEPARATOR_LINE.split(text) if b.strip()]
    instructions, dialogues = "", []
    for k, block in enumerate(blocks):
        first_turn = re.search(r"(?:^|\n\n)Human:", block)
        if k == 0 and (first_turn is None or first_turn.start() > 0):  # text before the first dialogue
            instructions = block[: first_turn.start()].strip() if first_turn else block
            block = block[first_turn.start():].strip() if first_turn else ""
            if not block:
                continue
        dialogues.append(_dialogue(block, f"{path} (dialogue {len(dialogues) + 1})"))
    return Context(path.stem, str(path), instructions, tuple(dialogues))


def load_context(spec: str | Path = BUILTIN) -> Context:
    """`builtin` (the HHH context shipped in `data/`) or a .yaml/.yml/.json/.txt file."""
    spec = str(spec).strip()
    if spec == BUILTIN:
        path, source = builtin_path("hhh_context.yaml"), BUILTIN
    else:
        path, source = Path(spec).expanduser(), None
        if not path.is_file():
            raise UserError(f"context {spec!r}: file not found; give a .yaml, .json or .txt context file, or `builtin`")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        ctx = _from_mapping(load_yaml(path), path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the syntax") from None
        ctx = _from_mapping(data, path)
    elif suffix in (".txt", ""):
        try:
            ctx = _from_text(path.read_text(encoding="utf-8"), path)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    else:
        raise UserError(f"context {spec!r}: unsupported file type {suffix!r}; use .yaml, .json or .txt")
    if not ctx.instructions and not ctx.examples:
        raise UserError(f"context {spec!r}: empty context (no instructions and no example dialogues); write some, or use `builtin`")
    return Context(ctx.name, source or ctx.source, ctx.instructions, ctx.examples)
