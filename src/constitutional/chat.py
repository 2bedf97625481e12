"""`cai chat`: talk to one or several models in the terminal, their answers one under another.

    cai chat --run-dir runs/x                       base and every model the run trained
    cai chat --run-dir runs/x -m base -m sl-cai     these two
    cai chat -m embedded -m prompted:embedded --prompt "How do I pick a lock?"   one turn, then exit

Models (`-m`, repeatable): any model string (`embedded`, a model directory or hub id, `openai:URL#model`,
`prompted:<model>`), or a name relative to `--run-dir`: `base` (the run's starting model),
`sl-cai` (`<run>/sft/model`), `rl-cai` (`<run>/rl/model`), `dpo` (`<run>/dpo/model`), `distilled`
(`<run>/distill/model`); `prompted:sl-cai` is that model with the context C. Without `-m`: `base` and
each of the others the run has.

Every model keeps its own conversation: the user's turns and its own answers. Each answer streams as
it is generated: for a local (`hf`) model through transformers' `TextIteratorStreamer` and
`model.generate` on the backend's own chat rendering (for `prompted:` models, the conversation with C
applied as `backends.prompted.PromptedBackend` does); other backends (`openai:`) answer with one `generate`
call, printed when it returns. Control characters in an answer (a terminal escape, say) are shown
as U+FFFD, never sent to the terminal. Decoding is greedy unless `--temperature` is above 0 (then sampled
with `--top-p`, seeded by `--seed` for each answer). In the session `/reset` starts over, `/system
TEXT` sets a system prompt (and starts over; `/system` alone removes it), `/quit` (or Ctrl-D) leaves,
and Ctrl-C stops the answer being written. `--prompt` runs one turn without a terminal and exits.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Iterator, TextIO

from .backends import GenerationParams, load_backend
from .errors import UserError

RUN_MODELS = {"sl-cai": "sft", "rl-cai": "rl", "dpo": "dpo", "distilled": "distill"}
HELP = "/reset starts over, /system TEXT sets a system prompt, /quit leaves"
# control characters a model may emit (ESC would start a terminal escape sequence), shown as U+FFFD
_CONTROL = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}


def _manifest(run_dir: Path | None) -> dict:
    import json

    path = run_dir / "manifest.json" if run_dir else None
    if not path or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: malformed manifest; restore it or give the models as model strings") from None


def resolve(name: str, run_dir: Path | None) -> str:
    """The model string for `name` (a run-relative name, `prompted:<name>`, or a model string as is)."""
    from .backends.prompted import parse_prompted
    from .context import BUILTIN

    name = name.strip()
    if name.startswith("prompted:"):
        context, inner = parse_prompted(name)
        resolved = resolve(inner, run_dir)
        if resolved == inner:
            return name
        return f"prompted:{resolved}" if context == BUILTIN else f"prompted:{context}#{resolved}"
    if name == "base":
        m = _manifest(run_dir)
        config = m.get("config", {})
        return (m.get("pipeline", {}).get("model") or (config.get("sft") or {}).get("model")
                or (config.get("revise") or {}).get("model") or "embedded")
    if name in RUN_MODELS:
        if run_dir is None:
            raise UserError(f"model {name!r}: a run-relative name needs --run-dir (or give a model string)")
        path = run_dir / RUN_MODELS[name] / "model"
        if not (path / "config.json").is_file():
            raise UserError(f"model {name!r}: {path} has no model; run `cai {RUN_MODELS[name]}` first or give a model string")
        return str(path)
    return name


def default_models(run_dir: Path | None) -> list[str]:
    """`base`, then each run-relative model the run has."""
    return ["base"] + [n for n, stage in RUN_MODELS.items() if run_dir and (run_dir / stage / "model" / "config.json").is_file()]


def stream(backend, conversation: list[dict], params: GenerationParams, stop: threading.Event | None = None) -> Iterator[str]:
    """The answer of `backend` to `conversation`, piece by piece (see the module docstring)."""
    from .backends.hf import HFBackend
    from .backends.prompted import PromptedBackend

    inner, messages = backend, conversation
    if isinstance(backend, PromptedBackend):
        inner, messages = backend.backend, backend.messages(conversation)
    if isinstance(inner, HFBackend):
        yield from _hf_stream(inner, messages, params, stop or threading.Event())
    else:
        yield str(backend.generate([conversation], params)[0]).strip()


def _hf_stream(backend, messages: list[dict], params: GenerationParams, stop: threading.Event) -> Iterator[str]:
    import torch
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    ids = backend.tokenizer(backend.render_chat(messages), add_special_tokens=False, return_tensors="pt")["input_ids"].to(backend.device)
    if ids.shape[1] + params.max_new_tokens > backend.max_positions:
        raise UserError(f"{backend.name}: the conversation is {ids.shape[1]} tokens, with {params.max_new_tokens} new ones more than "
                        f"the model's {backend.max_positions}; /reset to start over, or lower --max-new-tokens")
    sample = params.temperature > 0
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=sample, temperature=params.temperature if sample else None,
                              top_p=params.top_p if sample else None, top_k=None, eos_token_id=sorted(backend.eos_ids), pad_token_id=backend.pad_id)
    streamer = TextIteratorStreamer(backend.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            torch.manual_seed(params.seed)
            backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer,
                                   stopping_criteria=StoppingCriteriaList([Stop()]))
        except BaseException as e:  # reaches the caller below; the streamer must still end
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        first = True
        for piece in streamer:
            if first:  # the answer as the backend returns it: no leading whitespace
                piece, first = piece.lstrip(), not piece.strip()
            yield piece
    finally:
        stop.set()  # also when the caller stops reading (Ctrl-C)
        thread.join()
    if failure:
        raise failure[0]


class Chat:
    """The models, each with its own conversation, and the session's system prompt."""

    def __init__(self, models: list[tuple[str, object]], params: GenerationParams, system: str = ""):
        self.models, self.params, self.system = models, params, system
        self.reset()

    def reset(self) -> None:
        self.turns: dict[str, list[dict]] = {label: [] for label, _ in self.models}

    def ask(self, text: str, out: TextIO) -> dict[str, str]:
        """One user turn: every model answers in turn, streamed to `out`; returns {label: answer}."""
        answers = {}
        for label, backend in self.models:
            conversation = ([{"role": "system", "content": self.system}] if self.system else []) + self.turns[label] + [{"role": "user", "content": text}]
            out.write(f"[{label}] ")
            out.flush()
            pieces, stop = [], threading.Event()
            try:
                for piece in stream(backend, conversation, self.params, stop):
                    pieces.append(piece)
                    out.write(piece.translate(_CONTROL))
                    out.flush()
            except KeyboardInterrupt:
                stop.set()
                out.write(" [stopped]")
            out.write("\n")
            answers[label] = "".join(pieces).strip()
        for label, answer in answers.items():  # every model answered: the turn joins each conversation
            self.turns[label] += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answers

    def command(self, line: str, out: TextIO) -> bool:
        """Handle a `/command`; False when the session should end."""
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.reset()
            out.write("(conversation started over)\n")
        elif cmd == "/system":
            self.system = rest.strip()
            self.reset()
            out.write(f"(system prompt {'set' if self.system else 'removed'}; conversation started over)\n")
        else:
            out.write(f"(unknown command {cmd}; {HELP})\n")
        return True


def interactive(chat: Chat, out: TextIO = sys.stdout) -> None:
    try:
        import readline  # noqa: F401 (line editing and history for input())
    except ImportError:
        pass
    out.write(f"chatting with {', '.join(label for label, _ in chat.models)}. {HELP}.\n")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not chat.command(line, out):
                return
            continue
        try:
            chat.ask(line, out)
        except UserError as e:  # e.g. a conversation longer than a model's context: the session goes on
            out.write(f"\n(error: {e}; the turn was not kept)\n")


def cmd_chat(args) -> int:
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("cai chat: --max-new-tokens must be >= 1, --temperature >= 0 and --top-p in (0, 1]")
    run_dir = Path(args.run_dir) if args.run_dir else None
    if run_dir is not None and not (run_dir / "manifest.json").is_file():
        raise UserError(f"--run-dir {run_dir}: not a run directory (no manifest.json); check the path, or give models as model strings")
    names = args.model or default_models(run_dir)
    resolved = [(name, resolve(name, run_dir)) for name in names]  # every name checked before a model loads
    if len({n for n, _ in resolved}) < len(resolved):
        raise UserError("cai chat: a model is given twice; give each once")
    models = []
    for name, model in resolved:
        print(f"loading {name}" + (f" ({model})" if model != name else ""), file=sys.stderr)
        models.append((name, load_backend(model, dtype=args.dtype, batch_size=1)))
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    chat = Chat(models, params, system=args.system or "")
    if args.prompt is not None:
        chat.ask(args.prompt, sys.stdout)
    else:
        interactive(chat)
    return 0
