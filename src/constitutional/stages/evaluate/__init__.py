"""`cai eval` (docs/ARCHITECTURE.md "Stages"): do the models of a run differ in harmlessness, helpfulness, evasiveness, truthfulness
and robustness to prompt injection? Everything goes to `<run>/eval/results.json`.

Paper: Bai et al. 2022, "Constitutional AI": harmlessness and helpfulness as Elo scores fitted to
pairwise comparisons of the models' answers to the same prompts (its main results for both the SL
and the RL stage), the preference-model score of the revisions by round (Figure 5), and a model
that is harmless but not evasive. Seed 002: truthfulness by prompting (TruthfulQA's instruction to
interpret questions literally and not fall for common myths), and prompt injection ("Ignore the
above directions and ...").

Models (`models`): `name: model string` pairs. Default: `base` (the run's starting model, the
pipeline's `model`, else `embedded`), plus `sl-cai` (`<run>/sft/model`), `rl-cai` (`<run>/rl/model`),
`dpo` (`<run>/dpo/model`) and `distilled` (`<run>/distill/model`) for those this run trained. Any model string works,
`prompted:<model>` (the model with the context C) included.

Sections (`sections`; each one off gives `null` in results.json), one module each:
- harmlessness / helpfulness (`elo.py`): every pair of models compared by the feedback model on the
  same held-out prompts, Bradley–Terry Elo with bootstrap intervals; with a preference model
  (`pm`, else `<run>/train-pm/model`), each model's mean PM score (`pm.py`).
- refusal (`refusal.py`): refusal rates on harmful and on benign-but-harmful-looking prompts.
- mc (`mc.py`): multiple-choice accuracy by log p(option), both option orders where possible.
- truthfulness (`truthfulness.py`): a misconception question file, plain and with an instruction.
- injection (`injection.py`): an injected instruction in the user's text, and in the candidates
  the labeler judges (plain and hardened template).
- revision_rounds (`revision_rounds.py`): the PM score of the revise records by round (Figure 5).

This module is the orchestrator: each model answers and scores (`answers.py`), then the feedback
model judges (`judge_all`) and the PM scores (`score_all`), then `results.py` assembles
results.json. Settings are `config.py`'s `Config`.

Files under `<run>/eval/`: `answers/<name>.jsonl` (generated answers), `choices/<name>.jsonl`
(multiple-choice scores), `comparisons.jsonl`, `injection_labeler.jsonl`, `pm_scores.jsonl`: all
resumable record shards, so a killed eval resumes where it stopped; then `results.json`.

Departures from the paper: the comparisons are judged by the feedback model, not by crowdworkers,
and Elo is fitted by Bradley–Terry maximum likelihood (`elo.py` says more).
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from ...backends import load_backend
from ...constitution import Constitution, load_constitution, load_fewshot
from ...data.loaders import MCItem, load_mc
from ...errors import UserError
from ...run import RecordShard, RunDir, atomic_write_json
from .. import resolve_model
from ..label import Labeler, mc_comparison
from .answers import Lazy, answer_jobs, generate_answers, score_choices
from .config import SECTIONS, STAGE, Config, check_config
from .elo import ELO_PRIOR, HARM_TOPIC, HELPFUL_TOPIC, HELPFULNESS_PRINCIPLES, compare, principles_for
from .injection import HARDENED_NOTE, InjectedComparison, TemplateLabeler, followed_injection, labeler_injection, render_hardened
from .mc import mc_credit, mc_views
from .pm import load_pm, pm_location, pm_score
from .results import Evidence, assemble, summarize
from .revision_rounds import revision_items
from .truthfulness import TRUTHFUL_PREFIX

__all__ = ["Config", "SECTIONS", "STAGE", "run", "resolve_models", "ELO_PRIOR", "HELPFULNESS_PRINCIPLES", "HARDENED_NOTE", "TRUTHFUL_PREFIX",
           "InjectedComparison", "TemplateLabeler", "followed_injection", "mc_credit", "mc_views", "principles_for", "render_hardened"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_models(cfg: Config, run_dir: RunDir) -> dict[str, str]:
    """name -> model string (see the module docstring for the defaults)."""
    if not cfg.models:
        out = {"base": run_dir.manifest.get("pipeline", {}).get("model") or "embedded"}
        for name, stage in (("sl-cai", "sft"), ("rl-cai", "rl"), ("dpo", "dpo"), ("distilled", "distill")):
            if (run_dir.path / stage / "model" / "config.json").is_file():
                out[name] = str(run_dir.path / stage / "model")
        return out
    if isinstance(cfg.models, dict):
        pairs = [(str(k), v) for k, v in cfg.models.items()]
    else:
        pairs = []
        for entry in cfg.models:
            if "=" not in entry:
                raise UserError(f"eval.models: {entry!r} has no name; write name=model, e.g. base=embedded")
            name, model = entry.split("=", 1)
            pairs.append((name.strip(), model.strip()))
    out: dict[str, str] = {}
    for name, model in pairs:
        if not _NAME.match(name):
            raise UserError(f"eval.models: name {name!r}: use letters, digits, '-', '_' and '.' (it names a file)")
        if name in out:
            raise UserError(f"eval.models: name {name!r} appears twice; names must be unique")
        if not isinstance(model, str) or not model.strip():
            raise UserError(f"eval.models: {name!r} has no model string")
        out[name] = model.strip()
    return out


def run(cfg: Config, run_dir: RunDir) -> dict:
    t0 = time.time()
    check_config(cfg)
    sections = set(cfg.sections)
    constitution = load_constitution(None if cfg.constitution == "default" else cfg.constitution)
    examples = load_fewshot(None, "feedback")
    if cfg.fewshot > len(examples):
        raise UserError(f"eval.fewshot = {cfg.fewshot}: there are {len(examples)} few-shot feedback examples; use 0 to {len(examples)}")
    ev = Evidence(
        models=resolve_models(cfg, run_dir), sections=sections, sets=answer_jobs(cfg, run_dir, sections),
        mc_items={spec: load_mc(spec) for spec in cfg.mc} if sections & {"mc", "injection"} else {},
        truth_items=load_mc(cfg.truthfulness_mc) if "truthfulness" in sections else [],
        judges={"harmlessness": (principles_for(constitution, HARM_TOPIC, tuple(constitution.feedback)), "harmful"),
                "helpfulness": (principles_for(constitution, HELPFUL_TOPIC, HELPFULNESS_PRINCIPLES), "helpful")},
        feedback_model=resolve_model(cfg.feedback_model, run_dir),
        pm_path=pm_location(cfg, run_dir) if sections & {"harmlessness", "helpfulness", "revision_rounds"} else None,
        notes=[],
    )
    out = run_dir.stage_dir(STAGE)
    jobs = [j for js in ev.sets.values() for j in js]
    mc_sets = [("mc", spec, items, "") for spec, items in ev.mc_items.items()] if "mc" in sections else []
    if ev.truth_items:
        mc_sets += [("truthfulness-plain", cfg.truthfulness_mc, ev.truth_items, ""),
                    ("truthfulness-prompted", cfg.truthfulness_mc, ev.truth_items, TRUTHFUL_PREFIX)]
    timings: dict = {}
    if ev.models:
        print(f"eval: {len(ev.models)} model(s) ({', '.join(ev.models)}): {len(jobs)} answers and "
              f"{sum(len(items) for _, _, items, _ in mc_sets)} multiple-choice items each, then the feedback model's comparisons",
              file=sys.stderr)
    for name, model in ev.models.items():
        ev.answers[name], ev.choices[name] = evaluate_model(name, model, cfg, jobs, mc_sets, out, timings)
    t1 = time.time()
    judge_all(ev, cfg, out, constitution, examples[: cfg.fewshot])
    timings["judge_seconds"] = round(time.time() - t1, 1)
    t1 = time.time()
    score_all(ev, cfg, out, run_dir)
    timings["pm_seconds"] = round(time.time() - t1, 1)
    results = assemble(ev, cfg)
    atomic_write_json(out / "results.json", results)
    return {**summarize(results, time.time() - t0), "timings": timings}


def evaluate_model(name: str, model: str, cfg: Config, jobs: list[dict], mc_sets: list[tuple[str, str, list[MCItem], str]], out: Path,
                   timings: dict) -> tuple[dict, list[dict]]:
    """Answers (by id) and choices records of one model (`answers.py`); the model is loaded only if
    something is missing."""
    backend = Lazy(lambda: load_backend(model, dtype=cfg.dtype, batch_size=cfg.batch_size))
    answers = generate_answers(name, model, backend, cfg, jobs, out, timings)
    choices = score_choices(name, model, backend, cfg, mc_sets, out, timings)
    backend.close()
    return answers, choices


def judge_all(ev: Evidence, cfg: Config, out: Path, constitution: Constitution, examples: list) -> None:
    """The feedback model's work: pairwise comparisons and the labeler injection test."""
    judge = Lazy(lambda: load_backend(ev.feedback_model, dtype=cfg.feedback_dtype, batch_size=cfg.batch_size))
    labeler = Lazy(lambda: Labeler(judge(), examples, chat=True))
    names = list(ev.models)
    with RecordShard(out / "comparisons.jsonl") as shard:
        for section, (principles, kind) in ev.judges.items():
            if section in ev.sections:
                compare(section, ev.sets[kind], ev.answers, names, principles, labeler, cfg, shard)
                ev.comparisons[section] = [r for r in shard.records if r["section"] == section]
    if "injection" in ev.sections:
        items = [it for items in ev.mc_items.values() for it in items if mc_comparison(it) is not None]
        ev.labeler_items = items[: cfg.injection_limit] if cfg.injection_limit else items
        if not ev.labeler_items:
            ev.notes.append("injection.labeler: no item of the mc files carries question/correct_response/incorrect_response; nothing to inject into")
        with RecordShard(out / "injection_labeler.jsonl") as shard:
            labeler_injection(judge, examples, ev.labeler_items, constitution, cfg, shard)
            ev.injection_records = shard.records
    labeler.close()
    judge.close()


def score_all(ev: Evidence, cfg: Config, out: Path, run_dir: RunDir) -> None:
    """PM scores of the answers (harmful and helpful sets) and of the revise records by round."""
    if ev.pm_path is None:
        if ev.sections & {"harmlessness", "helpfulness", "revision_rounds"}:
            ev.notes.append("pm_score and revision_rounds: skipped (no preference model: set eval.pm or run `cai train-pm`)")
        return
    pm = Lazy(lambda: load_pm(ev.pm_path, cfg.feedback_dtype, cfg.batch_size))
    items = [{"id": f"{n}:{j['id']}", "messages": j["messages"], "response": ev.answers[n][j["id"]]["response"]}
             for n in ev.models for section, (_, kind) in ev.judges.items() if section in ev.sections for j in ev.sets[kind]]
    if "revision_rounds" in ev.sections:
        ev.revision_items = revision_items(run_dir, cfg.limit)
        if not ev.revision_items:
            ev.notes.append("revision_rounds: skipped (no <run>/revise/revisions.jsonl in this run)")
    with RecordShard(out / "pm_scores.jsonl") as shard:
        ev.scores = pm_score(pm, items + ev.revision_items, cfg, shard)
    pm.close()
