"""`cai eval`'s settings: the sections it measures and the one `Config` (docs/ARCHITECTURE.md "Stages")."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import opt
from ...errors import UserError

STAGE = "eval"
SECTIONS = ("harmlessness", "helpfulness", "refusal", "mc", "truthfulness", "injection", "revision_rounds")


@dataclass
class Config:
    models: dict[str, str] | list[str] = opt([], "models to compare: a mapping name: model string, or a list of name=model; empty = base (the run's starting model) plus sl-cai, rl-cai, dpo and distilled where this run trained them")
    feedback_model: str = opt("auto", "the judge of the pairwise comparisons and the labeler under injection: auto (this run's SL-CAI model if trained, else the starting model), embedded, a directory or hub id")
    pm: str = opt("", "preference model directory for PM scores; empty = this run's train-pm/model when it exists, else PM scores are skipped")
    constitution: str = opt("default", "constitution whose feedback principles judge the comparisons: default or a path")
    fewshot: int = opt(8, "few-shot feedback examples before each comparison (0 to 8, as in cai label)")
    dtype: str = opt("auto", "dtype of the evaluated models: auto (bf16 where the hardware has it), bfloat16 or float32")
    feedback_dtype: str = opt("float32", "dtype of the feedback model and the PM (float32: bf16 scoring noise is too large for labels)")
    batch_size: int = opt(8, "prompts per generation or scoring call")
    redteam_prompts: str = opt("builtin:redteam", "harmful prompts (test split): harmlessness comparisons and the refusal rate; join sets with '+'")
    helpful_prompts: str = opt("builtin:helpful", "helpful prompts (test split): helpfulness comparisons and the texts of the injection tasks")
    benign_prompts: str = opt("builtin:benign", "benign prompts that look harmful (all of them): the over-refusal rate")
    limit: int = opt(0, "prompts per set, and revise records for revision_rounds (0 = all)")
    refusal_limit: int = opt(-1, "prompts per set for the refusal rates alone (harmful and benign; -1 = limit, 0 = all): the rates need more prompts than the judge's comparisons can afford")
    max_new_tokens: int = opt(128, "tokens per answer")
    temperature: float = opt(0.0, "sampling temperature of the answers (0 = greedy)")
    repetition_penalty: float = opt(1.0, "penalty on tokens an answer already contains (1 = none; small models loop at low temperature without one)")
    mc: list[str] = opt(["builtin:mc"], "multiple-choice files ({prompt, corrects, incorrects} JSONL or BIG-bench task.json); also the items of the labeler injection test")
    truthfulness_mc: str = opt("builtin:truthfulness", "multiple-choice question file scored with and without the truthfulness instruction")
    injection_limit: int = opt(16, "prompts with an injected instruction, and labeler items with an injected candidate (0 = all)")
    bootstrap: int = opt(1000, "bootstrap resamples for the confidence intervals")
    sections: list[str] = opt(list(SECTIONS), "what to measure: " + ", ".join(SECTIONS))
    seed: int = opt(0, "random seed: sampling, principle draws, bootstrap")


def check_config(cfg: Config) -> None:
    unknown = [s for s in cfg.sections if s not in SECTIONS]
    if unknown:
        raise UserError(f"eval.sections: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    if cfg.refusal_limit < -1:
        raise UserError(f"eval.refusal_limit = {cfg.refusal_limit}: use -1 (the same as limit), 0 (all) or a count")
    for name in ("limit", "injection_limit", "fewshot"):
        if getattr(cfg, name) < 0:
            raise UserError(f"eval.{name} = {getattr(cfg, name)}: must be >= 0")
    for name in ("batch_size", "bootstrap", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"eval.{name} = {getattr(cfg, name)}: must be >= 1")
    if cfg.temperature < 0 or cfg.repetition_penalty <= 0:
        raise UserError(f"eval.temperature = {cfg.temperature}, repetition_penalty = {cfg.repetition_penalty}: need >= 0 (0 = greedy) and > 0 (1 = none)")
