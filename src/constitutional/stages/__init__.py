"""Pipeline stages, in data-flow order (docs/ARCHITECTURE.md "Data flow").

Each stage is a module (or a package) with a typed `Config` dataclass and `run(config, run_dir) ->
summary`; `STAGES` names them for the CLI, the pipeline and the run directory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageInfo:
    name: str  # CLI subcommand and run-directory folder
    module: str  # constitutional.stages.<module>
    help: str


STAGES = [
    StageInfo("baseline", "baseline", "measure the starting model: answers to red-team prompts, multiple-choice accuracy and position bias"),
    StageInfo("redteam", "redteam", "generate more red-team prompts from seed prompts (few-shot)"),
    StageInfo("revise", "revise", "critique -> revision rounds on red-team prompts (SL-CAI data)"),
    StageInfo("sft", "sft", "fine-tune on the revisions mixed with helpful samples (SL-CAI model)"),
    StageInfo("sample", "sample", "sample two responses per prompt from the SL-CAI model"),
    StageInfo("label", "label", "AI-feedback preference labels from a feedback model and the constitution"),
    StageInfo("train-pm", "preference", "train the preference model on the soft labels"),
    StageInfo("rl", "rl", "RL-CAI: optimise the policy against the preference model with a KL penalty"),
    StageInfo("dpo", "dpo", "DPO: optimise the policy on the soft labels and/or revision pairs directly (no PM, no RL)"),
    StageInfo("distill", "distill", "context distillation: fine-tune without the context C to match p(y|C,x)"),
    StageInfo("eval", "evaluate", "compare models: harmlessness and helpfulness Elo, refusals, multiple choice, truthfulness, prompt injection"),
    StageInfo("report", "report", "the HTML report of a run directory"),
]

BY_NAME = {s.name: s for s in STAGES}


def resolve_model(spec: str, run_dir, prefer: tuple[str, ...] = ("sft",)) -> str:
    """A stage's model string: `auto` means the model trained by this run's `prefer` stages (first
    one whose `<run>/<stage>/model` exists), else the run's starting model (the pipeline's `model`
    recorded in the manifest), else `embedded`; any other string is used as given."""
    if spec != "auto":
        return spec
    for stage in prefer:
        path = run_dir.path / stage / "model"
        if (path / "config.json").is_file():
            return str(path)
    return run_dir.manifest.get("pipeline", {}).get("model") or "embedded"


def load_prompt_sets(spec: str, run_dir, split: str = "all", limit: int = 0) -> list:
    """Prompts from one or more sets joined by '+' (e.g. `builtin:redteam+run:redteam`).

    `run:<stage>` is `<run>/<stage>/prompts.jsonl` of this run (e.g. `cai redteam`'s output).
    `split` (train, test or all) filters each set; `limit` (0 = all) caps each set.
    """
    from ..data.loaders import load_prompts
    from ..errors import UserError

    if split not in ("train", "test", "all"):
        raise UserError(f"split {split!r}: use train, test or all")
    out, seen = [], set()
    for part in [p.strip() for p in spec.split("+") if p.strip()]:
        path = part
        if part.startswith("run:"):
            path = run_dir.path / part[4:] / "prompts.jsonl"
            if not path.is_file():
                raise UserError(f"{part}: {path} does not exist; run `cai {part[4:]}` first or drop {part!r} from the prompt sets")
        for p in load_prompts(path, limit=limit or None, split=None if split == "all" else split):
            if p.id in seen:
                raise UserError(f"{part}: prompt id {p.id!r} also appears in an earlier prompt set; ids must be unique across sets")
            seen.add(p.id)
            out.append(p)
    if not out:
        raise UserError(f"{spec!r}: no prompt sets given")
    return out


def load(name: str):
    """The stage module for `name` (imported on first use: `cai --help` loads no stage's dependencies)."""
    return importlib.import_module(f"constitutional.stages.{BY_NAME[name].module}")
