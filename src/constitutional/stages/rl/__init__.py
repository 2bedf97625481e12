"""`cai rl`: RL-CAI: optimise the SL-CAI policy against the preference model with a KL penalty.

Paper: Bai et al. 2022 (Constitutional AI) §4: "we train a preference model ... then fine-tune the SL-CAI
model with RL against this PM", the reward being the PM score and a KL penalty keeping the policy near
where it started; seed 002's "REINFORCE on text": sample N generations, weight each one's
log-probability gradient by its reward. Here:

- policy: `policy` (auto = this run's SL-CAI model `<run>/sft/model`, else the starting model);
  reference: a frozen copy of it (with LoRA: the same weights with the adapter switched off);
- reward: the PM's score r(prompt, response) (`<run>/train-pm/model`, or `reward_model`),
  optionally whitened over each generation batch (`normalize_reward`) and then reduced by
  `length_penalty` reward units per 100 completion tokens (against a PM that pays for length);
- prompts: the train split of the red-team prompts mixed with `helpful_ratio` helpful prompts per
  red-team prompt, so the policy is rewarded on helpful requests as well as harmful ones;
- algorithm: `rloo` (default; `trl.RLOOTrainer`): REINFORCE with a leave-one-out baseline over
  `num_generations` samples per prompt and the KL in the reward: r - β·Σ_t log π/π_ref (`rl_math.py`);
  `grpo` (`trl.GRPOTrainer`): group-normalised advantages, KL (k3) added to the per-token loss.
  One generation per optimizer step and one update per generation, so both are on-policy.
- rollouts: sampled by the `hf` backend around the policy being trained (`rollouts=backend`,
  rollouts.py; seeded per step, so a resumed run samples as an uninterrupted one), or by TRL's HF
  `generate` (`rollouts=trl`); TRL computes the log-probabilities of the sampled ids either way.
  The step's completions may be trained in micro-batches (`memory_mb`, training.plan_step): same
  generation, same gradient.

Guards: `max_kl` stops training once TRL's logged KL (nats per completion token, mean over the batch)
passes the bound, and records the step and why; when the PM's held-out or multiple-choice accuracy
(`train-pm/metrics.json`) is within 0.1 of chance and the reward nevertheless climbed, a warning
(stderr and summary) says that the reward had nothing to teach.

Written under `<run>/rl/`: `metrics.jsonl` (one record per step: `rl/reward` (shaped, as trained on),
`rl/reward_std`, `rl/score` / `rl/score_std` (the raw PM score), `rl/kl`, `rl/length` (tokens),
`rl/truncated`, `rl/entropy` (nats per token), `rl/lr`, `rl/loss`, `rl/step_seconds`; with `report_to`,
TRL's log also goes to TensorBoard, `logs/`, and/or W&B: training.py);
`model/` (plain transformers directory, LoRA merged, README.md card; appears by an atomic rename);
`train.json` (the training summary; a rerun after a crash in the evaluation does not retrain);
`eval.json` + `eval_samples.jsonl`: on `eval_prompts` test-split prompts per set, the RL-CAI and the
SL-CAI policy answer with the same sampling settings and seeds; the PM scores both (means, and a 95%
percentile-bootstrap interval of the mean paired difference), the feedback model compares them in both
orders through the label stage's `Labeler` (win rate of RL-CAI with a 95% Wilson interval; a tie
counts half), and KL(RL-CAI ‖ SL-CAI) is estimated on the RL-CAI samples (same estimator as training,
nats per response, the end-of-turn token not counted). Checkpoints go to `checkpoints/` every
`save_steps`; a rerun resumes from the newest.

Departures: no PPO (TRL 1.16 has none; the paper used PPO): RLOO, REINFORCE with a leave-one-out
baseline and no value function; the KL is TRL's per-token estimate rather than an exact KL; the paper's
PM was pre-trained on human helpfulness labels, ours only sees what `cai train-pm` saw; the defaults are
sized for a 135M model on a CPU. Several processes: as `cai sft` (the held-out evaluation runs on the main one).

Layout: `reward.py` (the PM reward and its chance warning), `versus_sl_cai.py` (the held-out
comparison with SL-CAI), `records.py` (what rl and dpo share around the trainer), `config.py`; this
module builds the trainer, trains and writes the outputs.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from ... import distributed
from ...config import to_dict
from ...errors import UserError
from ...memory import peak_mb
from ...run import RecordShard, RunDir, atomic_write_json, atomic_write_text, now, read_jsonl
from .. import load_prompt_sets, resolve_model
from ...training import (checkpointing_setting, skip_final_checkpoint, keep_matching_checkpoints, last_checkpoint, load_causal_lm, lora_config, plan_step,
                        report_targets, save_model, speed, tracking, trainer_args, training_dtype)
from .config import Config
from .records import inputs_fingerprint, mean, model_stamp, on_log_callback
from .reward import PolicyReward, ScoreFn, chance_warning, pm_at_chance, read_pm_metrics, reward_model_dir
from .versus_sl_cai import eval_sets, evaluate

__all__ = ["Config", "run", "PolicyReward", "chance_warning", "training_prompts", "eval_sets", "evaluate", "build_trainer", "MetricsRecorder",
           "on_log_callback", "mean", "inputs_fingerprint", "model_stamp"]

STAGE = "rl"


# ---------------------------------------------------------------------------------------- inputs
def _check(cfg: Config) -> None:
    if cfg.algorithm not in ("rloo", "grpo"):
        raise UserError(f"rl.algorithm {cfg.algorithm!r}: use rloo or grpo (TRL 1.16 has no PPO trainer)")
    if cfg.num_generations < 2:
        raise UserError(f"rl.num_generations {cfg.num_generations}: need >= 2 samples per prompt for a baseline")
    for name in ("max_steps", "batch_size", "max_new_tokens", "save_steps", "lora_r", "lora_alpha"):
        if getattr(cfg, name) < 1:
            raise UserError(f"rl.{name} {getattr(cfg, name)}: must be >= 1")
    for name in ("learning_rate", "temperature"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"rl.{name} {getattr(cfg, name)}: must be > 0")
    for name in ("beta", "helpful_ratio", "length_penalty", "max_kl", "limit", "eval_prompts"):
        if getattr(cfg, name) < 0:
            raise UserError(f"rl.{name} {getattr(cfg, name)}: must be >= 0")
    if cfg.max_kl > 0 and cfg.beta == 0:
        raise UserError("rl.max_kl needs rl.beta > 0: TRL measures the KL only when it keeps a reference model")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"rl.dtype {cfg.dtype!r}: use auto, bfloat16 or float32")
    report_targets(cfg.report_to, "rl.report_to")
    if cfg.rollouts not in ("backend", "trl"):
        raise UserError(f"rl.rollouts {cfg.rollouts!r}: use backend or trl")
    checkpointing_setting(cfg.gradient_checkpointing, "rl.gradient_checkpointing")


def training_prompts(cfg: Config, run_dir: RunDir) -> tuple[list[dict], dict]:
    """TRL conversational rows `{prompt: messages, id, source}`: the red-team prompts, then
    round(helpful_ratio x their number) helpful prompts drawn with the seed; and the counts."""
    redteam = load_prompt_sets(cfg.prompts, run_dir, split=cfg.split, limit=cfg.limit)
    helpful = []
    if cfg.helpful_prompts and cfg.helpful_ratio > 0:
        pool = load_prompt_sets(cfg.helpful_prompts, run_dir, split=cfg.split, limit=cfg.limit)
        random.Random(cfg.seed).shuffle(pool)
        helpful = pool[: round(cfg.helpful_ratio * len(redteam))]
    clash = {p.id for p in redteam} & {p.id for p in helpful}
    if clash:
        raise UserError(f"rl.helpful_prompts: prompt id {sorted(clash)[0]!r} is also a red-team prompt id; ids must be unique across the two sets")
    rows = [{"prompt": p.messages, "id": p.id, "source": s} for s, ps in (("redteam", redteam), ("helpful", helpful)) for p in ps]
    if len(rows) < cfg.batch_size:
        raise UserError(f"rl: {len(rows)} training prompts, fewer than rl.batch_size {cfg.batch_size}; use more prompts or a smaller batch")
    return rows, {"redteam": len(redteam), "helpful": len(helpful)}


# ---------------------------------------------------------------------------------------- reward


# ---------------------------------------------------------------------------------------- training
METRICS = {  # TRL log key -> our record key
    "reward": "rl/reward", "reward_std": "rl/reward_std", "rl/score": "rl/score", "rl/score_std": "rl/score_std",
    "kl": "rl/kl", "completions/mean_length": "rl/length", "completions/clipped_ratio": "rl/truncated",
    "entropy": "rl/entropy", "learning_rate": "rl/lr", "loss": "rl/loss", "step_time": "rl/step_seconds",
}


def step_record(logs: dict, step: int) -> dict | None:
    """One metrics record from a TRL training log (None for logs without a reward, e.g. the final one)."""
    if "reward" not in logs:
        return None
    return {"id": f"step-{step:06d}", "step": step, **{ours: logs.get(theirs) for theirs, ours in METRICS.items()}}


class MetricsRecorder:
    """Appends each step's record, `record(logs, step)` (None: no record), to `metrics.jsonl` as
    training goes (an `on_log` callback)."""

    def __init__(self, shard: RecordShard, record: Callable[[dict, int], dict | None] = step_record):
        self.shard, self.record = shard, record

    def on_log(self, args, state, control, logs=None):
        record = self.record(logs or {}, state.global_step)
        if record is not None:
            self.shard.append(record)


class KLGuard:
    """An `on_log` callback: stops training once the logged KL (nats per token) passes `max_kl`;
    `stopped` says when and why."""

    def __init__(self, max_kl: float):
        self.max_kl, self.stopped = max_kl, None

    def on_log(self, args, state, control, logs=None):
        kl = (logs or {}).get("kl")
        if self.max_kl > 0 and kl is not None and kl > self.max_kl and self.stopped is None:
            reason = f"KL to the reference {kl:.4f} nats/token passed max_kl {self.max_kl} at step {state.global_step}"
            self.stopped = {"step": state.global_step, "kl": kl, "max_kl": self.max_kl, "reason": reason}
            control.should_training_stop = True
            print(f"[rl] stopping: {reason}", file=sys.stderr)


def build_trainer(cfg: Config, rows: list[dict], policy: str, reward: PolicyReward, checkpoint_dir: Path, callbacks=()):
    """A `trl.RLOOTrainer` (or `GRPOTrainer`) on `rows`, float32 weights (bf16 autocast per `dtype`);
    `rollouts=backend` samples through the hf backend (rollouts.py). Micro-batches and gradient
    checkpointing follow `plan_step` for a step's B·G sequences of the longest prompt plus
    max_new_tokens: one generation of B·G completions per optimizer step either way, trained in
    m micro-batches of B·G/m (RLOO's loss is a mean over sequences, so the accumulated gradient is
    the whole generation's). `trainer.speed_facts` holds the decisions for the summary."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from ...rollouts import GRPOBackendRollouts, RLOOBackendRollouts, check_sampling

    _check(cfg)
    model, tokenizer = load_causal_lm(policy, "rl.policy")
    peft_config = lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None
    config_cls, trainer_cls = (RLOOConfig, RLOOTrainer) if cfg.algorithm == "rloo" else (GRPOConfig, GRPOTrainer)
    completions = cfg.batch_size * cfg.num_generations
    lengths = [len(tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               + cfg.max_new_tokens for r in rows]
    params = sum(p.numel() for p in model.parameters())
    reference = 4 * params if cfg.beta > 0 and not cfg.lora else 0  # TRL loads a float32 copy
    plan = plan_step(cfg.gradient_checkpointing, model.config, lengths, completions, True, training_dtype(cfg.dtype) == "bfloat16", params,
                     0 if cfg.lora else params, "rl.gradient_checkpointing", held=4 * params + reference, limit_mb=cfg.memory_mb)
    if cfg.rollouts == "backend":
        trainer_cls = type(trainer_cls.__name__, (RLOOBackendRollouts if cfg.algorithm == "rloo" else GRPOBackendRollouts, trainer_cls), {})
    args = config_cls(
        **trainer_args(checkpoint_dir, training_dtype(cfg.dtype), cfg.save_steps, cfg.seed, cfg.report_to),
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=completions // plan.micro_batches,  # completions, not prompts
        gradient_accumulation_steps=plan.micro_batches,
        steps_per_generation=plan.micro_batches,  # one generation of B·G completions per optimizer step
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        beta=cfg.beta,
        disable_dropout=True,  # policy and reference must score the same tokens identically
        activation_checkpointing=plan.checkpointing,  # TRL's default: on
        activation_checkpointing_kwargs={"use_reentrant": False} if plan.checkpointing else None,
    )
    if cfg.rollouts == "backend":
        check_sampling(args)
    trainer = trainer_cls(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[on_log_callback(c) for c in callbacks])
    skip_final_checkpoint(trainer)
    trainer.speed_facts = {**plan.facts, "rollouts": cfg.rollouts}
    return trainer


# ---------------------------------------------------------------------------------------- output
def model_card(cfg: Config, summary: dict, evaluation: dict | None) -> str:
    settings = "\n".join(f"| {k} | {v} |" for k, v in to_dict(cfg).items())
    lines = [
        "---", "library_name: transformers", "tags: [constitutional-ai, rl-cai, trl, " + cfg.algorithm + "]", "---",
        "# RL-CAI model", "",
        f"Trained by `cai rl` (constitutional) from `{summary['policy']}` against the preference model `{summary['reward_model']}`",
        f"({cfg.algorithm.upper()}, KL coefficient {cfg.beta} to a frozen copy of the starting policy; Constitutional AI §4).",
        f"{'LoRA adapter merged into the weights' if cfg.lora else 'All weights trained'}.", "",
        "## Training",
        f"- prompts: {summary['prompts']['redteam']} red-team + {summary['prompts']['helpful']} helpful ({cfg.split} split)",
        f"- steps: {summary['steps']} (resumed from step {summary['resumed_from_step']})"
        + (f"; stopped early: {summary['stopped_early']['reason']}" if summary["stopped_early"] else ""),
        f"- mean PM score, first -> last 10% of steps: {summary['score_first']} -> {summary['score_last']}; final KL {summary['kl_last']} nats/token",
        f"- {summary['seconds_per_step']} s/step, peak memory {summary['peak_memory_mb']} MB, dtype {summary['dtype']}",
        *[f"- WARNING: {w}" for w in summary["warnings"]],
        "", "| setting | value |", "|---|---|", settings,
    ]
    if evaluation:
        a = evaluation["all"]
        lines += ["", "## RL-CAI vs SL-CAI on held-out prompts",
                  f"- {a['prompts']} prompts; PM score {a['pm_score_rl_cai']:.3f} vs {a['pm_score_sl_cai']:.3f}, difference "
                  f"{a['pm_score_difference']:.3f} (95% CI {a['pm_score_difference_ci95'][0]:.3f} to {a['pm_score_difference_ci95'][1]:.3f})",
                  f"- win rate of RL-CAI judged by `{evaluation['feedback_model']}`: {a['win_rate_rl_cai']:.2f} "
                  f"(95% CI {a['win_rate_ci95'][0]:.2f} to {a['win_rate_ci95'][1]:.2f})"]
    lines += ["", f"date: {now()}", ""]
    return "\n".join(lines)


def train(cfg: Config, run_dir: RunDir, rows: list[dict], counts: dict, policy: str, reward: PolicyReward, pm_metrics: dict | None,
          reward_name: str) -> tuple[dict, dict]:
    """Train (resuming from the newest checkpoint), save `<run>/rl/model`; return the training summary
    and, in a single process with all weights trained, the models the evaluation needs, as they are
    in memory: {"rl": the trained policy, "sl": the frozen reference (the SL-CAI policy; None with
    beta 0), "tokenizer"}, unwrapped from accelerate's mixed-precision forward (empty otherwise)."""
    out = run_dir.stage_dir(STAGE)
    checkpoint_dir = out / "checkpoints"
    resume = last_checkpoint(checkpoint_dir)
    resumed_from = int(resume.name.split("-", 1)[1]) if resume else 0
    with distributed.main_first() as main:
        if main:  # metrics of steps after the checkpoint belong to a run that is redone now
            kept = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= resumed_from]
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    guard = KLGuard(cfg.max_kl)  # every rank sees the same (gathered) logs, so all stop together
    # the main process appends the metrics file; the other ranks keep their copy in memory
    with RecordShard(out / "metrics.jsonl") if distributed.is_main() else _MemoryShard() as shard, tracking(cfg.report_to, out, "rl.report_to"):
        trainer = build_trainer(cfg, rows, policy, reward, checkpoint_dir, callbacks=[MetricsRecorder(shard), guard])
        if resume and distributed.is_main():
            print(f"[rl] resuming from {resume}", file=sys.stderr)
        t0 = time.time()
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        seconds = time.time() - t0
        records = list(shard.records)
    steps = trainer.state.global_step
    tokens = trainer.state.num_input_tokens_seen - trainer._initial_num_input_tokens_seen  # prompt + completion, all processes
    scores = [r["rl/score"] for r in records if r.get("rl/score") is not None]
    tail = max(1, len(records) // 10)
    warnings = [w for w in [chance_warning(pm_metrics, scores)] if w]
    for w in warnings:
        print(f"[rl] WARNING: {w}", file=sys.stderr)
    summary = {
        "policy": policy, "reward_model": reward_name, "algorithm": cfg.algorithm, "prompts": counts,
        "steps": steps, "resumed_from_step": resumed_from, "stopped_early": guard.stopped,
        "score_first": mean([r["rl/score"] for r in records[:tail]]), "score_last": mean([r["rl/score"] for r in records[-tail:]]),
        "reward_last": mean([r["rl/reward"] for r in records[-tail:]]), "kl_last": mean([r["rl/kl"] for r in records[-tail:]]),
        "length_last": mean([r["rl/length"] for r in records[-tail:]]),
        "pm_heldout_accuracy": ((pm_metrics or {}).get("heldout") or {}).get("accuracy"),
        "pm_mc_accuracy": ((pm_metrics or {}).get("mc") or {}).get("accuracy"),
        "warnings": warnings, "seconds": round(seconds, 1), **speed(seconds, steps - resumed_from, tokens), **trainer.speed_facts,
        "peak_memory_mb": peak_mb(),
        "lora": cfg.lora, "dtype": training_dtype(cfg.dtype), "model": str(out / "model"),
    }
    save_model(trainer, out / "model", model_card(cfg, summary, None))  # every rank takes part
    if distributed.world_size() > 1 or cfg.lora:  # sharded weights; a merged adapter has no reference left
        return summary, {}
    ref = _plain_forward(trainer.ref_model) if trainer.ref_model is not None else None
    return summary, {"rl": _plain_forward(trainer.model), "sl": ref, "tokenizer": trainer.processing_class}


def _plain_forward(model):
    """`model` without accelerate's mixed-precision wrapper around its forward (bf16 autocast), so
    it computes as the float32 model loaded from disk would. accelerate's own unwrap
    (keep_fp32_wrapper=False) follows `__wrapped__` past transformers' kwarg-renaming decorators
    (TRL's fused-head forward is `functools.wraps`-ed), which loses `past_key_values`."""
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:
        model.forward = original
    return model


class _MemoryShard:
    """A `RecordShard` stand-in that writes nothing (the training ranks other than the main one)."""

    def __init__(self):
        self.records: list[dict] = []

    def append(self, record: dict) -> None:
        self.records.append(record)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run(cfg: Config, run_dir: RunDir, reward_fn: ScoreFn | None = None) -> dict:
    """The stage. `reward_fn(conversations, responses) -> scores` replaces the preference model (tests)."""
    _check(cfg)
    out = run_dir.stage_dir(STAGE)
    rows, counts = training_prompts(cfg, run_dir)
    held_out = eval_sets(cfg, run_dir)
    pm_dir = reward_model_dir(cfg, run_dir)
    if reward_fn is None and not (pm_dir / "config.json").is_file():
        raise UserError(f"{pm_dir}: no preference model there; run `cai train-pm` first or set rl.reward_model")
    pm_metrics = read_pm_metrics(pm_dir)
    if pm_at_chance(pm_metrics) and distributed.is_main():
        print(f"[rl] note: the preference model is near chance ({pm_at_chance(pm_metrics)}); its reward may carry no signal", file=sys.stderr)
    if reward_fn is None:
        from ...preference_model import PreferenceModel

        reward_fn = PreferenceModel.from_pretrained(pm_dir, dtype=cfg.dtype, batch_size=cfg.batch_size * cfg.num_generations).score
        reward_name, reward_stamp = str(pm_dir), model_stamp(pm_dir)
    else:  # an injected reward is the caller's to keep fixed across a resume
        reward_name, reward_stamp = getattr(reward_fn, "__name__", "injected reward function"), None
    policy = resolve_model(cfg.policy, run_dir)

    # A checkpoint or a trained model is only valid for the prompts and models it was trained with.
    from ...backends import model_path

    fingerprint, checkpoint_dir = inputs_fingerprint(rows, model_stamp(model_path(policy)), reward_stamp), out / "checkpoints"
    stamp = checkpoint_dir / "inputs.sha256"
    with distributed.main_first() as main:  # the main process cleans up and writes; the other ranks then read
        if main:
            keep_matching_checkpoints(out, stamp, fingerprint, "rl", "inputs")
    done = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else {}
    loaded: dict = {}
    if done.get("fingerprint") == fingerprint and (out / "model" / "config.json").is_file():
        summary = done["summary"]  # trained before the evaluation failed: evaluate only
    else:
        reward = PolicyReward(reward_fn, cfg.normalize_reward, cfg.length_penalty)
        summary, loaded = train(cfg, run_dir, rows, counts, policy, reward, pm_metrics, reward_name)
        gc.collect()  # the trainer (optimizer state, gradients) is in reference cycles
        if distributed.is_main():
            atomic_write_json(out / "train.json", {"fingerprint": fingerprint, "summary": summary})
    if not distributed.is_main():
        return {}  # the held-out evaluation (generation, labeling) runs in the main process

    if held_out:
        evaluation, samples = evaluate(cfg, run_dir, held_out, policy, out / "model", reward_fn, loaded=loaded)
        atomic_write_text(out / "eval_samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        atomic_write_json(out / "eval.json", evaluation)
        atomic_write_text(out / "model" / "README.md", model_card(cfg, summary, evaluation))
        summary = {**summary, "eval": evaluation["all"], "eval_feedback_model": evaluation["feedback_model"]}
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return summary
