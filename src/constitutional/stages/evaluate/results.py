"""`<run>/eval/results.json` and the stage summary, assembled from what the sections collected
(`Evidence`): one entry per section, null when the section is off (docs/ARCHITECTURE.md "Record
formats")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...config import to_dict
from ...constitution import Constitution
from ...data.loaders import MCItem
from .config import Config
from .elo import ELO_PRIOR, elo_section
from .injection import INJECTION, LABELER_INJECTION, flips, followed
from .mc import judge_accuracy, mc_entry, mc_views
from .pm import mean_ci
from .refusal import refusal_changes, refusal_jobs, refusal_rates
from .revision_rounds import rounds
from .truthfulness import TRUTHFUL_PREFIX, truthfulness_entry

SAMPLES = 2  # answers per set (red-team, helpful) kept in results.json as samples


@dataclass
class Evidence:
    """What the stage collected, from which results.json is assembled."""

    models: dict[str, str]
    sections: set[str]
    sets: dict[str, list[dict]]
    mc_items: dict[str, list[MCItem]]
    truth_items: list[MCItem]
    judges: dict[str, tuple[Constitution, str]]  # section -> (its principles, the answer set it judges)
    feedback_model: str
    pm_path: Path | None
    notes: list[str]
    # filled in by run, judge_all and score_all
    answers: dict[str, dict[str, dict]] = field(default_factory=dict)  # name -> answer id -> record
    choices: dict[str, list[dict]] = field(default_factory=dict)  # name -> multiple-choice records
    comparisons: dict[str, list[dict]] = field(default_factory=dict)  # section -> comparison records
    labeler_items: list[MCItem] = field(default_factory=list)
    injection_records: list[dict] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # PM score by item id
    revision_items: list[dict] = field(default_factory=list)


def assemble(ev: Evidence, cfg: Config) -> dict:
    """results.json: models, datasets, settings, one entry per section (null when the section is off),
    samples and notes."""
    names, sets, notes = list(ev.models), ev.sets, ev.notes
    results = {
        "models": ev.models,
        "datasets": datasets(cfg, sets, ev.mc_items if "mc" in ev.sections else {}, ev.truth_items, ev.labeler_items),
        "settings": {**to_dict(cfg), "feedback_model": ev.feedback_model, "pm": str(ev.pm_path) if ev.pm_path else None,
                     "elo": {"anchor": names[0], "scale": "400/ln(10) Elo points per nat (400 points = 10:1 odds)",
                             "prior_even_comparisons_per_pair": ELO_PRIOR, "ci_level": 0.95},
                     "principles": {s: [p.id for p in principles.feedback] for s, (principles, _) in ev.judges.items()},
                     "truthful_prefix": TRUTHFUL_PREFIX, "user_injection": INJECTION, "labeler_injection": LABELER_INJECTION,
                     "refusal_classifier": "constitutional.refusal.is_refusal: refusal phrases at the start of the first two sentences"},
        "harmlessness": None, "helpfulness": None, "refusal": None, "mc": None, "judge": None, "truthfulness": None, "injection": None,
        "revision_rounds": None, "samples": {}, "notes": notes,
    }
    for section, (_, kind) in ev.judges.items():
        if section in ev.sections:
            recs = ev.comparisons[section]
            pm_part = {n: mean_ci([ev.scores[f"{n}:{j['id']}"] for j in sets[kind]], cfg) for n in names} if ev.pm_path and sets[kind] else None
            results[section] = {"elo": elo_section(recs, names, cfg), "pm_score": pm_part, "n_prompts": len(sets[kind]), "comparisons": len(recs)}
    if len(names) < 2 and ev.sections & {"harmlessness", "helpfulness"}:
        notes.append("harmlessness/helpfulness: one model only, so no comparisons (its Elo is 0 by the anchor)")
    if "refusal" in ev.sections:
        results["refusal"] = {n: refusal_rates(ev.answers[n], sets) for n in names}
        for n, change in refusal_changes(ev.answers, sets, names).items():
            results["refusal"][n]["change"] = change
    if "mc" in ev.sections:
        results["mc"] = {n: {spec: mc_entry([r for r in ev.choices[n] if r["kind"] == "mc" and r["spec"] == spec]) for spec in ev.mc_items} for n in names}
        results["judge"] = judge_accuracy(ev.models, ev.feedback_model, results["mc"])
    scored = (list(ev.mc_items.items()) if "mc" in ev.sections else []) + ([(cfg.truthfulness_mc, ev.truth_items)] if ev.truth_items else [])
    for spec, items in scored:
        both = sum(len(mc_views(it)) == 2 for it in items)
        notes.append(f"{spec}: {both} of {len(items)} items scored in both option orders" + (", the rest as given" if both < len(items) else ""))
    if ev.truth_items:
        results["truthfulness"] = {n: truthfulness_entry(ev.choices[n], len(ev.truth_items), str(cfg.truthfulness_mc)) for n in names}
    if "injection" in ev.sections:
        results["injection"] = {"user_content": {n: followed(ev.answers[n], sets["injection"]) for n in names},
                                "labeler": {t: flips([r for r in ev.injection_records if r["template"] == t], ev.labeler_items) for t in ("plain", "hardened")}}
    if ev.revision_items:
        results["revision_rounds"] = rounds(ev.revision_items, ev.scores, cfg)
    for n in names:
        results["samples"][n] = [{"prompt": j["prompt"], "response": ev.answers[n][j["id"]]["response"]}
                                 for kind in ("harmful", "helpful") for j in sets.get(kind, [])[:SAMPLES]]
    return results


def datasets(cfg: Config, sets: dict, mc_items: dict, truth_items: list, labeler_items: list) -> dict:
    def entry(spec, kind, split):
        return {"spec": spec, "split": split, "n": len(sets[kind])} if kind in sets else None

    return {
        "redteam": {**entry(cfg.redteam_prompts, "harmful", "test"), "n_refusal": len(refusal_jobs(sets, "harmful"))}
        if "harmful" in sets else None,
        "helpful": entry(cfg.helpful_prompts, "helpful", "test"),
        "benign": entry(cfg.benign_prompts, "benign", "all"),
        "mc": {spec: {"file": spec, "n": len(items)} for spec, items in mc_items.items()},
        "truthfulness": {"spec": cfg.truthfulness_mc, "file": cfg.truthfulness_mc, "n": len(truth_items)} if truth_items else None,
        "injection": {"user_content": entry(cfg.helpful_prompts, "injection", "test"),
                      "labeler": {"specs": list(cfg.mc), "n": len(labeler_items)}} if "injection" in sets else None,
    }


def summarize(results: dict, seconds: float) -> dict:
    """The stage summary: the headline numbers of results.json, rounded."""
    r4 = lambda x: None if x is None else round(x, 4)  # noqa: E731
    out: dict = {"models": list(results["models"])}
    for section in ("harmlessness", "helpfulness"):
        if results[section]:
            out[f"elo_{section}"] = {n: round(v["elo"], 1) for n, v in results[section]["elo"].items()}
    if results["refusal"]:
        out["refusal_harmful"] = {n: r4(v["harmful_refusal_rate"]) for n, v in results["refusal"].items()}
        out["refusal_benign"] = {n: r4(v["benign_refusal_rate"]) for n, v in results["refusal"].items()}
        out["engaged_harmful"] = {n: r4(v["harmful_engaged_rate"]) for n, v in results["refusal"].items()}
        out["engaged_benign"] = {n: r4(v["benign_engaged_rate"]) for n, v in results["refusal"].items()}
    if results["mc"]:
        out["mc_accuracy"] = {n: {s: r4(v["accuracy"]) for s, v in specs.items()} for n, specs in results["mc"].items()}
    if results["truthfulness"]:
        out["truthfulness"] = {n: [r4(v["plain"]), r4(v["prompted"])] for n, v in results["truthfulness"].items()}
    if results["injection"]:
        out["injection_followed"] = {n: r4(v["followed_rate"]) for n, v in results["injection"]["user_content"].items()}
        out["labeler_flip_rate"] = {t: r4(v["flip_rate"]) for t, v in results["injection"]["labeler"].items()}
    out["seconds"] = round(seconds, 1)
    return out
