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

Layout: `data.py` (the comparisons and pairs, the tokenizer check), `config.py` (settings and their
check); this module builds the trainer, trains, scores the held-out comparisons and writes the outputs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from ...config import to_dict
from ...errors import UserError
from ...memory import peak_mb
from ...run import RecordShard, RunDir, atomic_write_json, atomic_write_text, now, read_jsonl
from ...training import (keep_matching_checkpoints, skip_final_checkpoint, last_checkpoint, load_causal_lm, plan_step,
                        lora_config, save_model, speed, tracking, trainer_args, training_dtype)
from .. import resolve_model
from .. import rl
from .config import Config, check_config
from .data import check_tokenizers, read_data, revision_pairs

__all__ = ["Config", "check_config", "run", "build_trainer", "check_tokenizers", "read_data", "revision_pairs"]

STAGE = "dpo"


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

    from ...dpo_trainer import SoftDPOTrainer
    from ...preference_model import preference_row

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
        # transformers 5's name for gradient_checkpointing (TRL's default: on); set here, in the
        # constructor, so the deprecated alias is never read (it warns when the new name is unset)
        activation_checkpointing=on,
        activation_checkpointing_kwargs={"use_reentrant": False} if on else None,
    )

    def dataset(pairs):
        return Dataset.from_list([{**preference_row(tokenizer, c.messages, c.chosen, c.rejected, c.p_chosen), "id": c.id, "source": s} for s, c in pairs])

    trainer = SoftDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset(rows),
                             eval_dataset=dataset(heldout_rows) if heldout_rows else None, processing_class=tokenizer,
                             peft_config=lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None,
                             callbacks=[rl.on_log_callback(c) for c in callbacks], hard=cfg.loss == "sigmoid")
    skip_final_checkpoint(trainer)
    trainer.speed_facts = facts
    return trainer


def heldout_metrics(sources: list[str], before: tuple, after: tuple, reference: tuple, beta: float) -> dict:
    """Held-out rankings, overall and per source: by log π(y|x) of the starting policy (`before`) and
    the trained one (`after`), and by the implicit reward β·(log πθ - log πref) (`reward`).
    before/after/reference: (chosen log-probs, rejected log-probs), one per held-out comparison."""
    from ...dpo_math import pair_metrics

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
        "peak_memory_mb": peak_mb(),
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

    from ...dpo_trainer import sequence_logps

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

    from ...backends import model_path

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
            from ...preference_model import PreferenceModel

            score = PreferenceModel.from_pretrained(pm_dir, dtype=cfg.dtype, batch_size=8).score
        evaluation, samples = rl.evaluate(ecfg, run_dir, held_out, policy, out / "model", score, name="dpo")
        evaluation["reward_model"] = str(pm_dir) if score else None
        atomic_write_text(out / "eval_samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        atomic_write_json(out / "eval.json", evaluation)
        atomic_write_text(out / "model" / "README.md", model_card(cfg, summary, evaluation))
        summary = {**summary, "eval": evaluation["all"], "eval_feedback_model": evaluation["feedback_model"]}
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary
