"""`cai dpo`: preference optimisation without RL: DPO on the AI-feedback soft labels and/or the revision pairs.

The alternative to `train-pm` + `rl` (Bai et al. 2022 §4 train a preference model and then RL against
it). Direct Preference Optimisation (Rafailov et al. 2023) trains the policy on the comparisons
themselves, with the frozen reference's log-ratio as the implicit reward (`dpo_math.py`). This is the
open Constitutional AI recipe of the alignment handbook (SFT on the revisions, then DPO with the final
revision as chosen and the initial response as rejected), plus something that recipe lacks: the soft
labels p_chosen of `cai label`, taken from both option orders, kept as per-example targets.

- policy: `policy` (auto = this run's SL-CAI model `<run>/sft/model`, else the starting model);
  reference: `reference` ('' = the policy's starting weights; with LoRA the policy with its adapter
  off); a reference with another vocabulary than the policy's tokenizer is refused.
- data (`data`, parts joined with '+'): `preferences` = `<run>/label/preferences.jsonl`, target
  p_chosen (the response with p >= 0.5 is `chosen`); `revisions` = `<run>/revise/revisions.jsonl`,
  per usable chain its last accepted revision (chosen) against the initial response (rejected), the
  prompt being the record's whole conversation `messages`, target 1; chains without a usable revision
  and revisions identical to the initial response are skipped and counted. `helpful` mixes in
  comparisons from a JSONL file (as `cai train-pm` reads them; p_chosen defaults to 1), all trained on.
  Rows reach TRL in its conversational prompt/chosen/rejected form (`preference_model.preference_row`).
- loss (`loss`): `soft` = -[p·log σ(βΔ) + (1 - p)·log σ(-βΔ)] per example; `sigmoid` = standard DPO
  on hard labels (ties, p = 0.5, are dropped). Trainer: `dpo_trainer.SoftDPOTrainer` (TRL's DPOTrainer).
- held out: comparisons on test-split prompts plus a `heldout` share of the others (by a hash of the
  id salted with "dpo:"), never trained on. `heldout.json` ranks them by log π(y|x) under the starting
  policy (`before`) and the trained one (`after`): accuracy = share with log π(chosen) > log π(rejected),
  margin = mean difference in nats; and by the implicit reward β·log πθ/πref after training (`reward`).
  All three models are loaded from their directories and score in float32, whatever the training dtype.
- the comparison with SL-CAI is `cai rl`'s (`rl.evaluate`): on `eval_prompts` test-split prompts per
  set both answer with the same sampling settings and seeds; the PM (`reward_model`, else this run's
  `train-pm/model` if there is one) scores both (bootstrap interval of the mean paired difference),
  the feedback model compares them in both orders (win rate of DPO, Wilson interval), and
  KL(DPO ‖ SL-CAI) per response is estimated on the DPO samples.

Written under `<run>/dpo/`: `metrics.jsonl` (per step: dpo/loss, dpo/margin (β·Δ), dpo/accuracy (share
with Δ > 0), dpo/chosen_reward, dpo/rejected_reward (β·log πθ/πref), dpo/kl (per-token KL to the
reference over the vocabulary at the response tokens, nats), dpo/logp_chosen, dpo/logp_rejected,
dpo/lr, dpo/grad_norm); `model/` (transformers directory, LoRA merged, README.md card, atomic rename);
`heldout.json`; `train.json` (a crash in the evaluation does not retrain); `eval.json` +
`eval_samples.jsonl`. Checkpoints every `save_steps` in `checkpoints/`; a rerun resumes from the newest.

Departures: DPO is not in the paper; the full next-token logits are computed for the KL (see
dpo_trainer.py); one process only (no `accelerate launch`); defaults sized for a 135M model on a CPU.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt, to_dict
from ..data.loaders import split_of
from ..errors import UserError
from ..run import RecordShard, RunDir, atomic_write_json, atomic_write_text, now, read_jsonl
from ..training import (checkpointing_setting, keep_matching_checkpoints, last_checkpoint, load_causal_lm, plan_step,
                        lora_config, report_targets, save_model, speed, tracking, trainer_args, training_dtype)
from . import resolve_model
from . import rl
from .preference import Comparison, read_comparisons
from .sft import prompt_messages, read_records

STAGE = "dpo"
SOURCES = ("preferences", "revisions")


@dataclass
class Config:
    policy: str = opt("auto", "the policy to train: auto (this run's SL-CAI model, else the starting model), a model directory, a hub id or embedded")
    reference: str = opt("", "the frozen reference: '' = the policy's starting weights (LoRA: the policy with its adapter off), else a model with the policy's tokenizer")
    data: str = opt("preferences", "comparisons, joined with '+': preferences (label/preferences.jsonl, soft labels), revisions (revise/revisions.jsonl: last revision vs initial response)")
    helpful: str = opt("", "helpfulness comparisons JSONL mixed into training (prompt, chosen, rejected, optional p_chosen, default 1); '' = none")
    loss: str = opt("soft", "soft (target p_chosen per example: -[p·log σ(βΔ) + (1-p)·log σ(-βΔ)]) or sigmoid (standard DPO on hard labels; ties dropped)")
    beta: float = opt(0.1, "β, the scale of the implicit reward β·log πθ/πref (larger: stay closer to the reference)")
    heldout: float = opt(0.2, "share of comparisons held out (by a hash of the id), besides those on test-split prompts")
    epochs: float = opt(1.0, "passes over the training comparisons (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps (0 = run `epochs` epochs)")
    learning_rate: float = opt(5e-6, "peak learning rate, linear decay (LoRA usually wants ~10x more)")
    batch_size: int = opt(2, "comparisons per optimizer step and device (each is two sequences); also the held-out scoring batch")
    grad_accum: int = opt(1, "forward passes per optimizer step")
    max_length: int = opt(512, "tokens per sequence (prompt + response), cut at the end; comparisons whose prompt fills it are dropped")
    lora: bool = opt(False, "train a LoRA adapter (merged into the weights at the end) instead of all weights")
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA scale numerator (scale = alpha / r)")
    dtype: str = opt("auto", "auto (bf16 autocast where the hardware has it, else float32), bfloat16 or float32")
    save_steps: int = opt(10, "steps between checkpoints (a rerun resumes from the newest)")
    reward_model: str = opt("", "preference model scoring DPO vs SL-CAI ('' = this run's train-pm/model if it exists, else no PM scores)")
    feedback_model: str = opt("auto", "judge of the DPO vs SL-CAI win rate: auto (the model this run's label stage used), embedded, a directory or hub id")
    prompts: str = opt("builtin:redteam", "red-team prompts of the DPO vs SL-CAI comparison (their test split); join sets with '+'")
    helpful_prompts: str = opt("builtin:helpful", "helpful prompts of that comparison (test split; '' = none)")
    eval_prompts: int = opt(8, "test-split prompts per set that DPO and SL-CAI answer (0 = skip that comparison)")
    temperature: float = opt(1.0, "sampling temperature of those answers")
    max_new_tokens: int = opt(64, "tokens per answer in that comparison")
    gradient_checkpointing: str = opt("auto", "auto (on only when the activations would not fit in memory), on or off")
    memory_mb: int = opt(0, "memory this process may use, MB: a batch is split into micro-batches (same steps and gradients), then checkpointed, until a step fits (0 = the machine's free memory)")
    report_to: str = opt("none", "experiment tracking: none, tensorboard (<run>/dpo/logs), wandb or tensorboard,wandb")
    seed: int = opt(0, "random seed (data order, LoRA init, sampling)")


# ---------------------------------------------------------------------------------------- inputs
def _check(cfg: Config) -> list[str]:
    """The data sources named by `cfg.data`; every setting checked."""
    parts = [p.strip() for p in cfg.data.split("+") if p.strip()]
    if not parts or any(p not in SOURCES for p in parts) or len(set(parts)) < len(parts):
        raise UserError(f"dpo.data {cfg.data!r}: use preferences, revisions or preferences+revisions")
    if cfg.loss not in ("soft", "sigmoid"):
        raise UserError(f"dpo.loss {cfg.loss!r}: use soft or sigmoid")
    checkpointing_setting(cfg.gradient_checkpointing, "dpo.gradient_checkpointing")
    report_targets(cfg.report_to, "dpo.report_to")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "lora_r", "lora_alpha", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"dpo.{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("beta", "learning_rate", "temperature"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"dpo.{name} {getattr(cfg, name)}: must be > 0")
    if cfg.max_steps < 0 or cfg.eval_prompts < 0 or (cfg.max_steps == 0 and cfg.epochs <= 0):
        raise UserError("dpo: max_steps and eval_prompts must be >= 0, and epochs > 0 when max_steps is 0")
    if not 0 <= cfg.heldout < 1:
        raise UserError(f"dpo.heldout {cfg.heldout}: must be in [0, 1)")
    training_dtype(cfg.dtype)
    return parts


def revision_pairs(path: Path) -> tuple[list[Comparison], dict]:
    """Per usable revision chain, (last accepted revision, initial response) with target 1; and the
    counts {records, unusable, identical} of what was read and skipped."""
    out, counts = [], {"records": 0, "unusable": 0, "identical": 0}
    for line, rec in read_records(path):
        where = f"{path}:{line}"
        counts["records"] += 1
        if not isinstance(rec.get("usable"), bool) or not isinstance(rec.get("rounds"), list) or not isinstance(rec.get("initial_response"), str):
            raise UserError(f"{where}: a revision record needs `usable`, `rounds` and `initial_response`; is this revise/revisions.jsonl?")
        if not rec["usable"]:
            counts["unusable"] += 1
            continue
        ok = [r["revision"] for r in rec["rounds"]
              if isinstance(r, dict) and r.get("status") == "ok" and isinstance(r.get("revision"), str) and r["revision"].strip()]
        if not ok:
            raise UserError(f"{where} (rounds): marked usable but no round has status ok and a revision; rerun `cai revise` or fix the record")
        if ok[-1].strip() == rec["initial_response"].strip():
            counts["identical"] += 1  # no difference to learn from
            continue
        rid = str(rec.get("id", line))
        split = rec.get("split") if rec.get("split") in ("train", "test") else split_of(rid)
        out.append(Comparison(rid, prompt_messages(rec, where), ok[-1], rec["initial_response"], 1.0, split))
    return out, counts


def read_data(cfg: Config, run_dir: RunDir) -> tuple[list[tuple[str, Comparison]], list[tuple[str, Comparison]], dict]:
    """(training, held-out) (source, comparison) pairs, chosen oriented to p_chosen >= 0.5 and ids
    prefixed with the source; and the counts. Every input is checked before a model loads."""
    found, counts = [], {}
    for source in _check(cfg):
        stage, name = ("label", "preferences.jsonl") if source == "preferences" else ("revise", "revisions.jsonl")
        path = run_dir.path / stage / name
        if not path.is_file():
            raise UserError(f"{path}: not found; run `cai {stage}` first, or leave {source} out of dpo.data")
        if source == "preferences":
            comps = read_comparisons(path)
        else:
            comps, counts["revision_records"] = revision_pairs(path)
        found += [(source, c) for c in comps]
    helpful = []
    if cfg.helpful:
        if not Path(cfg.helpful).is_file():
            raise UserError(f"{cfg.helpful}: helpfulness comparisons not found; check dpo.helpful or set it to \"\"")
        helpful = [("helpful", c) for c in read_comparisons(Path(cfg.helpful), default_p=1.0)]
    pairs = [(s, dataclasses.replace(_oriented(c), id=f"{s}/{c.id}")) for s, c in found + helpful]
    counts["ties_dropped"] = sum(c.p_chosen == 0.5 for _, c in pairs) if cfg.loss == "sigmoid" else 0
    if cfg.loss == "sigmoid":  # a tie says nothing about which response is better
        pairs = [(s, c) for s, c in pairs if c.p_chosen != 0.5]
    held = [s != "helpful" and (c.split == "test" or split_of(f"dpo:{c.id}", cfg.heldout) == "test") for s, c in pairs]
    train = [p for p, h in zip(pairs, held) if not h]
    heldout = [p for p, h in zip(pairs, held) if h]
    if not train:
        raise UserError(f"dpo.data {cfg.data!r}: no training comparisons ({len(pairs)} read, {len(heldout)} held out); "
                        "label or revise more prompts, or add comparisons with dpo.helpful")
    counts["train"] = {s: sum(p[0] == s for p in train) for s in dict.fromkeys(s for s, _ in pairs)}
    counts["heldout"] = {s: sum(p[0] == s for p in heldout) for s in dict.fromkeys(s for s, _ in heldout)}
    return train, heldout, counts


def _oriented(c: Comparison) -> Comparison:
    """The comparison with `chosen` the response its target prefers (p_chosen >= 0.5)."""
    return c if c.p_chosen >= 0.5 else dataclasses.replace(c, chosen=c.rejected, rejected=c.chosen, p_chosen=1.0 - c.p_chosen)


def check_tokenizers(policy: str, reference: str) -> None:
    """The reference must read the policy's token ids as the same tokens: equal vocabularies."""
    from transformers import AutoTokenizer

    from ..backends import model_path

    vocabs = []
    for spec, setting in ((policy, "dpo.policy"), (reference, "dpo.reference")):
        try:
            vocabs.append(AutoTokenizer.from_pretrained(model_path(spec)).get_vocab())
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"{setting} {spec!r}: cannot load its tokenizer ({first}); give a model directory, a hub id or embedded") from None
    if vocabs[0] != vocabs[1]:
        diff = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()))[0]
        raise UserError(f"dpo.reference {reference!r}: its tokenizer does not match the policy's ({len(vocabs[1])} vs {len(vocabs[0])} "
                        f"tokens; e.g. {diff[0]!r} -> {diff[1]}); use a reference with the policy's tokenizer, or leave dpo.reference empty")


# ---------------------------------------------------------------------------------------- training
METRICS = {  # the trainer's log key -> our record key
    "loss": "dpo/loss", "rewards/margins": "dpo/margin", "rewards/accuracies": "dpo/accuracy",
    "rewards/chosen": "dpo/chosen_reward", "rewards/rejected": "dpo/rejected_reward", "kl": "dpo/kl",
    "logps/chosen": "dpo/logp_chosen", "logps/rejected": "dpo/logp_rejected", "learning_rate": "dpo/lr", "grad_norm": "dpo/grad_norm",
}


def step_record(logs: dict, step: int) -> dict | None:
    """One metrics record from a training log (None for logs without the DPO metrics, e.g. the final one)."""
    if "rewards/margins" not in logs:
        return None
    return {"id": f"step-{step:06d}", "step": step, **{ours: logs.get(theirs) for theirs, ours in METRICS.items()}}


def build_trainer(cfg: Config, rows: list[dict], heldout_rows: list[dict], policy: str, reference: str, checkpoint_dir: Path, callbacks=()):
    """A `SoftDPOTrainer` on `rows` (held-out rows as its prepared eval set), float32 weights (bf16 autocast per `dtype`)."""
    from datasets import Dataset
    from trl import DPOConfig

    from ..dpo_trainer import SoftDPOTrainer
    from ..preference_model import preference_row

    model, tokenizer = load_causal_lm(policy, "dpo.policy")
    ref_model = None if cfg.lora and reference == policy else load_causal_lm(reference, "dpo.reference")[0]
    # TRL turns checkpointing on by default; on a small model it only costs time: decide by memory,
    # for a batch of the longest comparisons (chosen and rejected, padded to the longest) through the
    # policy, with the reference's weights held beside it
    lengths = [2 * min(cfg.max_length, len(tokenizer(tokenizer.apply_chat_template(list(c.messages) + [{"role": "assistant", "content": max(c.chosen, c.rejected, key=len)}],
                                                                                  tokenize=False), add_special_tokens=False)["input_ids"])) for _, c in rows] or [1]
    params = sum(p.numel() for p in model.parameters())
    bf16 = training_dtype(cfg.dtype) == "bfloat16"
    plan = plan_step(cfg.gradient_checkpointing, model.config, lengths, cfg.batch_size, True, bf16, params, 0 if cfg.lora else params,
                     "dpo.gradient_checkpointing", held=4 * params * (1 if ref_model is None else 2), limit_mb=cfg.memory_mb)
    on, facts = plan.checkpointing, plan.facts
    args = DPOConfig(
        **trainer_args(checkpoint_dir, training_dtype(cfg.dtype), cfg.save_steps, cfg.seed, cfg.report_to),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size // plan.micro_batches,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum * plan.micro_batches,  # same examples per optimizer step
        max_length=cfg.max_length,
        beta=cfg.beta,
        disable_dropout=True,  # policy and reference must score the same tokens identically
    )
    args.activation_checkpointing = on
    args.activation_checkpointing_kwargs = {"use_reentrant": False} if on else None

    def dataset(pairs):
        return Dataset.from_list([{**preference_row(tokenizer, c.messages, c.chosen, c.rejected, c.p_chosen), "id": c.id, "source": s} for s, c in pairs])

    trainer = SoftDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset(rows),
                             eval_dataset=dataset(heldout_rows) if heldout_rows else None, processing_class=tokenizer,
                             peft_config=lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None,
                             callbacks=[rl.on_log_callback(c) for c in callbacks], hard=cfg.loss == "sigmoid")
    trainer.speed_facts = facts
    return trainer


def heldout_metrics(sources: list[str], before: tuple, after: tuple, reference: tuple, beta: float) -> dict:
    """Held-out rankings, overall and per source: by log π(y|x) of the starting policy (`before`) and
    the trained one (`after`), and by the implicit reward β·(log πθ - log πref) (`reward`).
    before/after/reference: (chosen log-probs, rejected log-probs), one per held-out comparison."""
    from ..dpo_math import pair_metrics

    def block(idx: list[int]) -> dict:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        reward = [[beta * (a - r) for a, r in zip(pick(after[k]), pick(reference[k]))] for k in (0, 1)]
        return {"count": len(idx), "before": pair_metrics(pick(before[0]), pick(before[1])),
                "after": pair_metrics(pick(after[0]), pick(after[1])), "reward": pair_metrics(*reward)}

    return {"all": block(list(range(len(sources)))),
            "by_source": {s: block([i for i, x in enumerate(sources) if x == s]) for s in dict.fromkeys(sources)}}


def train(cfg: Config, run_dir: RunDir, data: tuple, policy: str, reference: str) -> dict:
    """Train (resuming from the newest checkpoint), measure the held-out comparisons, save `<run>/dpo/model`."""
    train_pairs, heldout_pairs, counts = data
    out = run_dir.stage_dir(STAGE)
    checkpoint_dir = out / "checkpoints"
    resume = last_checkpoint(checkpoint_dir)
    resumed_from = int(resume.name.split("-", 1)[1]) if resume else 0
    kept = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= resumed_from]  # later steps are redone
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    with RecordShard(out / "metrics.jsonl") as shard, tracking(cfg.report_to, out, "dpo.report_to"):
        trainer = build_trainer(cfg, train_pairs, heldout_pairs, policy, reference, checkpoint_dir,
                                callbacks=[rl.MetricsRecorder(shard, step_record)])
        if len(trainer.train_dataset) == 0:  # TRL drops comparisons whose prompt alone fills max_length
            raise UserError(f"dpo.max_length {cfg.max_length}: every training prompt fills it; raise dpo.max_length")
        if resume:
            print(f"[dpo] resuming from {resume}", file=sys.stderr)
        t0 = time.time()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.time() - t0
        records = list(shard.records)
    steps, tail = trainer.state.global_step, records[-max(1, len(records) // 10):]
    mean = lambda key, rs: rl.mean([r[key] for r in rs])  # noqa: E731
    held, collator = trainer.eval_dataset, trainer.data_collator
    summary = {
        "policy": policy, "reference": reference, "data": cfg.data, "loss": cfg.loss, "beta": cfg.beta,
        "comparisons": {**counts, "dropped_too_long": len(train_pairs) - len(trainer.train_dataset)
                        + len(heldout_pairs) - (len(held) if held else 0)},
        "steps": steps, "resumed_from_step": resumed_from,
        "loss_first": mean("dpo/loss", records[:1]), "loss_last": mean("dpo/loss", tail),
        "accuracy_last": mean("dpo/accuracy", tail), "margin_last": mean("dpo/margin", tail), "kl_last": mean("dpo/kl", tail),
        "seconds": round(seconds, 1), **trainer.speed_facts,
        **speed(seconds, steps - resumed_from, getattr(trainer, "_total_train_tokens", 0)),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "lora": cfg.lora, "dtype": training_dtype(cfg.dtype), "model": str(out / "model"),
    }
    save_model(trainer, out / "model", model_card(cfg, summary, None))
    del trainer  # frees the policy and the reference before the held-out models load
    heldout = {"count": 0, "note": "no held-out comparisons (raise dpo.heldout or label more pairs)"}
    if held:
        scores = score_heldout(held, collator, {"before": policy, "reference": reference, "after": str(out / "model")}, cfg.batch_size)
        heldout = {"count": len(held), **heldout_metrics(held["source"], scores["before"], scores["after"], scores["reference"], cfg.beta)}
    atomic_write_json(out / "heldout.json", heldout)
    h = heldout.get("all") or {}
    summary.update(
        heldout_comparisons=heldout["count"],
        heldout_accuracy_before=(h.get("before") or {}).get("accuracy"), heldout_accuracy_after=(h.get("after") or {}).get("accuracy"),
        heldout_margin_before=(h.get("before") or {}).get("margin"), heldout_margin_after=(h.get("after") or {}).get("margin"),
        heldout_reward_accuracy=(h.get("reward") or {}).get("accuracy"),
    )
    atomic_write_text(out / "model" / "README.md", model_card(cfg, summary, None))
    return summary


def score_heldout(held, collator, models: dict[str, str], batch_size: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per name in `models` (before, reference, after: model strings), the (chosen, rejected)
    log-probabilities of the held-out rows, each model loaded from its directory in float32 and
    scored without autocast: under bf16 autocast the same sequence's log-probability moves by
    nats, more than a small DPO run changes it. A model named twice is scored once."""
    import torch

    from ..dpo_trainer import sequence_logps

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    done: dict[str, tuple] = {}
    for name, spec in models.items():
        if spec not in done:
            model = load_causal_lm(spec, f"dpo.{name}")[0].to(device)
            done[spec] = sequence_logps(model, held, collator, batch_size)
            del model
    return {name: done[spec] for name, spec in models.items()}


# ---------------------------------------------------------------------------------------- output
def model_card(cfg: Config, summary: dict, evaluation: dict | None) -> str:
    settings = "\n".join(f"| {k} | {v} |" for k, v in to_dict(cfg).items())
    c = summary["comparisons"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "---", "library_name: transformers", f"tags: [constitutional-ai, dpo, trl, {cfg.loss}]", "---",
        "# DPO model", "",
        f"Trained by `cai dpo` (constitutional) from `{summary['policy']}` with Direct Preference Optimisation against the frozen",
        f"reference `{summary['reference']}` (β = {cfg.beta}, {cfg.loss} loss), without a preference model or RL.",
        f"{'LoRA adapter merged into the weights' if cfg.lora else 'All weights trained'}.", "",
        "## Training",
        f"- comparisons ({cfg.data}{' + helpful' if cfg.helpful else ''}): trained on {c['train']}, held out {c['heldout']}",
        f"- steps: {summary['steps']} (resumed from step {summary['resumed_from_step']}); loss {summary['loss_first']} -> {summary['loss_last']}; "
        f"final KL to the reference {summary['kl_last']} nats/token",
        f"- held-out accuracy of log π(chosen) > log π(rejected) on {summary.get('heldout_comparisons', 'the')} comparisons: "
        f"{fmt(summary.get('heldout_accuracy_before'))} before, {fmt(summary.get('heldout_accuracy_after'))} after",
        f"- {summary['seconds_per_step']} s/step, peak memory {summary['peak_memory_mb']} MB, dtype {summary['dtype']}",
        "", "| setting | value |", "|---|---|", settings,
    ]
    if evaluation:
        a = evaluation["all"]
        pm = (f"PM score {a['pm_score_dpo']:.3f} vs {a['pm_score_sl_cai']:.3f}, difference {a['pm_score_difference']:.3f} (95% CI "
              f"{a['pm_score_difference_ci95'][0]:.3f} to {a['pm_score_difference_ci95'][1]:.3f})" if a["pm_score_dpo"] is not None else "no PM scores")
        lines += ["", "## DPO vs SL-CAI on held-out prompts", f"- {a['prompts']} prompts; {pm}",
                  f"- win rate of DPO judged by `{evaluation['feedback_model']}`: {a['win_rate_dpo']:.2f} "
                  f"(95% CI {a['win_rate_ci95'][0]:.2f} to {a['win_rate_ci95'][1]:.2f})"]
    lines += ["", f"date: {now()}", ""]
    return "\n".join(lines)


def _eval_config(cfg: Config) -> rl.Config:
    """The settings `rl.eval_sets` and `rl.evaluate` read, taken from this stage's config."""
    return rl.Config(feedback_model=cfg.feedback_model, prompts=cfg.prompts, helpful_prompts=cfg.helpful_prompts, eval_prompts=cfg.eval_prompts,
                     temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)


def run(cfg: Config, run_dir: RunDir) -> dict:
    data = read_data(cfg, run_dir)
    ecfg = _eval_config(cfg)
    held_out = rl.eval_sets(ecfg, run_dir)
    pm_dir = Path(cfg.reward_model).expanduser() if cfg.reward_model else run_dir.path / "train-pm" / "model"
    if cfg.reward_model and not (pm_dir / "config.json").is_file():
        raise UserError(f"dpo.reward_model {cfg.reward_model!r}: no preference model there; run `cai train-pm` or set it to \"\"")
    policy = resolve_model(cfg.policy, run_dir)
    reference = cfg.reference or policy
    if reference != policy:
        check_tokenizers(policy, reference)

    from ..backends import model_path

    out = run_dir.stage_dir(STAGE)
    checkpoint_dir = out / "checkpoints"
    fingerprint = rl.inputs_fingerprint([(s, dataclasses.asdict(c)) for s, c in data[0] + data[1]],
                                  rl.model_stamp(model_path(policy)), rl.model_stamp(model_path(reference)))
    keep_matching_checkpoints(out, checkpoint_dir / "inputs.sha256", fingerprint, STAGE, "inputs")
    done = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}
    if done.get("fingerprint") == fingerprint and (out / "model" / "config.json").is_file():
        summary = done["summary"]  # trained before the evaluation failed: evaluate only
    else:
        summary = train(cfg, run_dir, data, policy, reference)
        atomic_write_json(out / "train.json", {"fingerprint": fingerprint, "summary": summary})
    if held_out:
        score = None
        if (pm_dir / "config.json").is_file():
            from ..preference_model import PreferenceModel

            score = PreferenceModel.from_pretrained(pm_dir, dtype=cfg.dtype, batch_size=8).score
        evaluation, samples = rl.evaluate(ecfg, run_dir, held_out, policy, out / "model", score, name="dpo")
        evaluation["reward_model"] = str(pm_dir) if score else None
        atomic_write_text(out / "eval_samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        atomic_write_json(out / "eval.json", evaluation)
        atomic_write_text(out / "model" / "README.md", model_card(cfg, summary, evaluation))
        summary = {**summary, "eval": evaluation["all"], "eval_feedback_model": evaluation["feedback_model"]}
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary
