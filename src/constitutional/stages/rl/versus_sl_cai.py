"""The held-out comparison of a trained policy with SL-CAI (`cai rl`'s, also used by `cai dpo`): both
policies answer the test-split prompts with the same seeds, the feedback model judges each pair in
both orders (the label stage's `Labeler` and settings), the PM scores both, and the KL of the
trained policy's samples to SL-CAI is estimated; results in `<run>/<stage>/eval.json`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ...config import build
from ...feedback import winner
from ...rl_math import bootstrap_mean_ci, kl_estimate, wilson_interval
from ...run import RunDir
from .. import load_prompt_sets, resolve_model

from .config import Config
from .reward import ScoreFn

def eval_sets(cfg: Config, run_dir: RunDir) -> list[tuple[str, object]]:
    """(set name, Prompt) for the held-out comparison: test-split prompts, `eval_prompts` per set."""
    if cfg.eval_prompts == 0:
        return []
    specs = [("redteam", cfg.prompts)] + ([("helpful", cfg.helpful_prompts)] if cfg.helpful_prompts else [])
    return [(name, p) for name, spec in specs for p in load_prompt_sets(spec, run_dir, split="test", limit=cfg.eval_prompts)]


def _label_config(run_dir: RunDir):
    """The label stage's settings as this run recorded them (defaults where it has none)."""
    from .. import label

    recorded = run_dir.manifest.get("config", {}).get("label") or {}
    names = {f.name for f in dataclasses.fields(label.Config)}
    return build(label.Config, {k: v for k, v in recorded.items() if k in names}, f"{run_dir.manifest_path} (config.label)")


def response_logprobs(backend, conversations: Sequence, responses: Sequence[list[int]], temperature: float) -> list:
    """Per-token log-probabilities (T,) of each response's token ids under `backend`'s model at
    `temperature` (the distribution the responses were sampled from), as float32 tensors."""
    import torch

    out = []
    with torch.no_grad():
        for conv, ids in zip(conversations, responses):
            prompt = backend.tokenizer(backend.render_chat(conv), add_special_tokens=False)["input_ids"]
            x = torch.tensor([prompt + list(ids)], device=backend.device)
            logits = backend.model(input_ids=x, use_cache=False).logits[0, len(prompt) - 1 : -1].float() / temperature
            out.append(torch.log_softmax(logits, -1).gather(-1, x[0, len(prompt):, None]).squeeze(-1).cpu())
    return out


def _compare(rows: list[dict], name: str = "rl_cai") -> dict:
    who = name.removesuffix("_cai")  # the sample keys: score_rl, p_rl, winner "rl" (rl_cai); score_dpo, ... (dpo)
    scored = all(r[f"score_{who}"] is not None for r in rows)
    diffs = [r[f"score_{who}"] - r["score_sl"] for r in rows] if scored else []
    lo, hi = bootstrap_mean_ci(diffs)
    credit = [0.5 if r["winner"] is None else float(r["winner"] == who) for r in rows]
    wlo, whi = wilson_interval(sum(credit), len(rows))
    kls = [r["kl"] for r in rows if r["kl"] is not None]
    return {
        "prompts": len(rows),
        "pm_score_sl_cai": sum(r["score_sl"] for r in rows) / len(rows) if scored else None,
        f"pm_score_{name}": sum(r[f"score_{who}"] for r in rows) / len(rows) if scored else None,
        "pm_score_difference": sum(diffs) / len(diffs) if scored else None,
        "pm_score_difference_ci95": [lo, hi],
        f"win_rate_{name}": sum(credit) / len(credit),
        "win_rate_ci95": [wlo, whi],
        "wins": sum(c == 1.0 for c in credit), "ties": sum(c == 0.5 for c in credit), "losses": sum(c == 0.0 for c in credit),
        f"mean_p_{name}_better": sum(r[f"p_{who}"] for r in rows) / len(rows),
        f"kl_{who}_to_sl_nats_per_response": sum(kls) / len(kls) if kls else None,
    }


def evaluate(cfg: Config, run_dir: RunDir, sets: list, sl_policy: str, rl_model: Path, score: ScoreFn | None,
             name: str = "rl_cai", loaded: dict | None = None) -> tuple[dict, list[dict]]:
    """The trained policy at `rl_model` (RL-CAI; DPO for `cai dpo`) vs SL-CAI on the held-out prompts
    `sets`: (eval results, per-prompt samples).

    `cfg` gives the sampling (max_new_tokens, temperature, seed), the judge (feedback_model) and the
    KL estimator (algorithm). `name` names the trained policy in the keys (`cai dpo` passes "dpo");
    without a preference model (`score` None) the PM scores are None. `loaded`: the float32 models
    already in memory (`train`'s), used instead of loading them again."""
    from ...backends import GenerationParams, load_backend
    from ...backends.hf import HFBackend
    from ...constitution import load_constitution, load_fewshot
    from ..label import Comparison, Labeler, combine, draw_principles

    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    convs = [p.messages for _, p in sets]
    answers, logprobs, rl_ids, loaded = {}, {}, [], loaded or {}
    trained, title = name.removesuffix("_cai"), name.replace("_", "-").upper()  # "rl", "RL-CAI"; "dpo", "DPO"
    for who, model in (("rl", str(rl_model)), ("sl", sl_policy)):  # same params and seeds: common random numbers
        if loaded.get(who) is not None:
            backend = HFBackend.from_model(loaded[who], loaded["tokenizer"], name=model, batch_size=8)
        else:
            backend = load_backend(model, dtype="float32", batch_size=8)
        ids = backend.generate_ids(convs, params)
        answers[who] = [backend.tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
        rl_ids = rl_ids or ids
        logprobs[who] = response_logprobs(backend, convs, rl_ids, cfg.temperature)  # of the RL-CAI samples
    sl_backend = backend
    kind = "k1" if cfg.algorithm == "rloo" else "k3"
    kls = [float(kl_estimate(a, b, kind).sum()) for a, b in zip(logprobs["rl"], logprobs["sl"])]
    s_rl, s_sl = (score(convs, answers["rl"]), score(convs, answers["sl"])) if score else ([None] * len(convs),) * 2

    lcfg = _label_config(run_dir)
    judge = resolve_model(cfg.feedback_model if cfg.feedback_model != "auto" else lcfg.feedback_model, run_dir)
    same = judge == sl_policy and lcfg.dtype == "float32"
    fb = sl_backend if same else load_backend(judge, dtype=lcfg.dtype, batch_size=lcfg.batch_size)
    constitution = load_constitution(None if lcfg.constitution == "default" else lcfg.constitution)
    labeler = Labeler(fb, load_fewshot(None, "feedback")[: lcfg.fewshot], chat=lcfg.chat, cot=lcfg.cot, cot_max_new_tokens=lcfg.cot_max_new_tokens,
                      cot_temperature=lcfg.cot_temperature, clamp_low=lcfg.clamp_low, clamp_high=lcfg.clamp_high, seed=lcfg.seed)
    comps = [Comparison(p.id, p.messages, (answers["rl"][i], answers["sl"][i]), draw_principles(constitution, lcfg.principles, lcfg.seed, p.id))
             for i, (_, p) in enumerate(sets)]
    chunks = [comps[k : k + lcfg.batch_size] for k in range(0, len(comps), lcfg.batch_size)]
    orders = [o for c in tqdm(chunks, desc=f"{trained}: {title} vs SL-CAI", unit="batch", file=sys.stderr) for o in labeler.label(c)]
    samples = []
    as_float = lambda x: None if x is None else float(x)  # noqa: E731
    for i, ((set_name, p), o) in enumerate(zip(sets, orders)):
        p_rl = combine(o)[0]  # P(response 0 = the trained policy better), both orders averaged
        w = winner(p_rl)
        samples.append({"id": p.id, "set": set_name, "prompt": p.prompt, name: answers["rl"][i], "sl_cai": answers["sl"][i],
                        f"score_{trained}": as_float(s_rl[i]), "score_sl": as_float(s_sl[i]), f"p_{trained}": p_rl,
                        "winner": None if w is None else (trained, "sl")[w], "kl": kls[i]})
    result = {
        "all": _compare(samples, name),
        "by_set": {n: _compare([s for s in samples if s["set"] == n], name) for n in dict.fromkeys(n for n, _ in sets)},
        "policies": {name: str(rl_model), "sl_cai": sl_policy}, "feedback_model": fb.name,
        "sampling": {"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
        "kl_estimator": kind, "training_split": cfg.split, "prompt_split": "test",
    }
    return result, samples
