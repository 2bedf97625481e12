"""`cai train-pm`: train the preference model (PM) on the AI-feedback soft labels.

Bai et al. 2022 (Constitutional AI) §4.1: "the harmlessness comparisons ... mixed with helpfulness
comparisons ... train a preference model", whose score is the RL stage's reward. Input: the `label`
stage's `<run>/label/preferences.jsonl` (`id, prompt, messages, chosen, rejected, p_chosen, split`),
optionally mixed with helpfulness comparisons from a JSONL file (`prompt` as text or messages,
`chosen`, `rejected`, optional `p_chosen`, default 1). Training is `trl.RewardTrainer` with the
soft-label loss of `preference_model.py`; it resumes from the latest checkpoint after a crash.

Written under `<run>/train-pm/`:
- `model/`: the PM as a transformers directory (safetensors, tokenizer, config with pad_token_id,
  README.md card), written to a temp folder and renamed; load it with `PreferenceModel.from_pretrained`;
- `loss.json`: the trainer's log history (loss, accuracy, margin, rewards per logged step), also
  sent to TensorBoard (`logs/`) and/or W&B with `report_to` (training.py);
- `metrics.json`: held-out agreement with the labeler and calibration (comparisons on test-split
  prompts and a `heldout` share of the others, by a hash of the id, are never trained on), and PM accuracy on the multiple-choice comparison set (the paper's
  "PM accuracy on HHH comparisons"): score(question, correct) > score(question, incorrect); the same
  metrics of the untrained PM (the base model with its fresh head) under `untrained`, the baseline.

Departures from the paper: the paper pretrains PMs (PMP) and mixes in human helpfulness labels at
scale; here the PM starts from the SL-CAI (or given) model with a fresh scalar head, and helpfulness
comparisons are whatever file `helpful` names (none by default). Helpful comparisons are all used for
training (none held out). Comparisons longer than `max_length` tokens are skipped, as TRL does, and
counted in the summary.

Several processes (`accelerate launch ... -m constitutional.cli train-pm`, configs/accelerate/):
data-parallel training; the main process measures the PM and writes the files (distributed.py).
`batch_size` is per process.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..data.loaders import file_stem, implicit_prompt, parse_transcript, read_rows, split_of
from ..errors import UserError
from .. import distributed
from ..run import RunDir, atomic_write_json, atomic_write_text, read_records
from ..training import checkpointing_setting, plan_step, skip_final_checkpoint, report_targets, speed, tracking
from . import resolve_model

STAGE = "train-pm"


@dataclass
class Config:
    model: str = opt("auto", "base model: auto (this run's SL-CAI model, else embedded), a local model directory or a hub id")
    preferences: str = opt("", "preference comparisons JSONL; empty = this run's label/preferences.jsonl")
    helpful: str = opt("", "helpfulness comparisons JSONL mixed into training (prompt, chosen, rejected, optional p_chosen); empty = none")
    epochs: float = opt(1.0, "passes over the training comparisons (ignored when max_steps > 0)")
    max_steps: int = opt(0, "optimizer steps (0 = run `epochs` epochs)")
    learning_rate: float = opt(5e-5, "AdamW learning rate (linear decay)")
    batch_size: int = opt(4, "comparisons per device per step (each is two sequences); also the scoring batch")
    grad_accum: int = opt(1, "gradient accumulation steps")
    max_length: int = opt(512, "skip comparisons whose chosen or rejected sequence is longer than this many tokens")
    dtype: str = opt("auto", "auto (bf16 mixed precision where the hardware has it), bfloat16, float16 or float32")
    gradient_checkpointing: str = opt("auto", "recompute activations in the backward pass (less memory, slower): auto (only when a batch would not fit in memory), on or off")
    group_by_length: bool = opt(True, "batch comparisons of similar length together (less padding; batches still in random order)")
    memory_mb: int = opt(0, "memory this process may use, MB: a batch is split into micro-batches (same steps and gradients), then checkpointed, until a step fits (0 = the machine's free memory)")
    save_steps: int = opt(50, "checkpoint every this many steps for resume (0 = no checkpoints)")
    heldout: float = opt(0.2, "share of comparisons held out for evaluation (by a hash of the id), besides those on test-split prompts")
    mc: str = opt("builtin:mc", "comparison set for PM accuracy (items with question/correct_response/incorrect_response); empty = skip")
    report_to: str = opt("none", "experiment tracking: none, tensorboard (<run>/train-pm/logs), wandb or tensorboard,wandb")
    seed: int = opt(0, "random seed (head initialisation, data order)")


@dataclass
class Comparison:
    id: str
    messages: list  # the conversation up to the response, chat messages
    chosen: str
    rejected: str
    p_chosen: float
    split: str


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        messages = parse_transcript(value) or [{"role": "user", "content": value}]
    elif isinstance(value, list) and value and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str) for m in value
    ):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise UserError(f"{where}: prompt must be non-empty text or a non-empty list of {{role, content}} messages")
    # An HH-RLHF style prompt ends with an empty "Assistant:" turn: the response fills it.
    while len(messages) > 1 and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages


def _response(value, where: str) -> str:
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        value = value[-1].get("content")  # TRL's form: [{"role": "assistant", "content": ...}]
    if not isinstance(value, str):
        raise UserError(f"{where}: expected the response text (or [{{role: assistant, content}}])")
    return value


def read_comparisons(path: Path, default_p: float | None = None) -> list[Comparison]:
    """Comparisons from any file `loaders.read_rows` reads (JSONL, gzipped or not, Parquet, a datasets
    directory); every malformed record is a one-line `UserError` naming it and the missing field.

    A record without `prompt`/`messages` (HH-RLHF) is split by `loaders.implicit_prompt`.
    `p_chosen` is required unless `default_p` is given; `split` defaults to the hash of the id.
    """
    out, seen = [], set()
    for n, (rec, where) in enumerate(read_rows(path, "comparison")):
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object with prompt, chosen, rejected, p_chosen")
        rec = {k: v for k, v in rec.items() if v is not None}  # null = missing, in every format
        missing = [k for k in ("chosen", "rejected") if k not in rec]
        if missing:
            raise UserError(f"{where}: missing field {missing[0]!r}; expected prompt (or messages), chosen, rejected, p_chosen")
        if "messages" in rec or "prompt" in rec:
            messages = _messages(rec["messages"] if "messages" in rec else rec["prompt"], f"{where} (prompt)")
        else:
            messages, rec["chosen"], rec["rejected"] = implicit_prompt(rec["chosen"], rec["rejected"], where)
        p = rec.get("p_chosen", default_p)
        if p is None:
            raise UserError(f"{where}: missing field 'p_chosen' (the labeler's probability that chosen is better)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise UserError(f"{where} (p_chosen): {p!r} is not a probability in [0, 1]")
        rid = str(rec.get("id", f"{file_stem(path)}-{n:05d}"))
        if rid in seen:
            raise UserError(f"{where}: duplicate id {rid!r}; ids must be unique")
        seen.add(rid)
        split = rec.get("split") if rec.get("split") in ("train", "test") else split_of(rid)
        out.append(Comparison(rid, messages, _response(rec["chosen"], f"{where} (chosen)"), _response(rec["rejected"], f"{where} (rejected)"), float(p), split))
    return out


def _mc_pairs(spec: str) -> list:
    from ..data.loaders import load_mc

    items = [it for it in load_mc(spec) if {"question", "correct_response", "incorrect_response"} <= set(it.meta)]
    if not items:
        raise UserError(f"{spec}: no items with question, correct_response and incorrect_response; set train-pm.mc to such a set or to \"\" to skip")
    return items


def _mc_metrics(pm, items) -> dict:
    prompts = [it.meta["question"] for it in items]
    scores = pm.score(prompts * 2, [it.meta["correct_response"] for it in items] + [it.meta["incorrect_response"] for it in items])
    right = [scores[i] > scores[len(items) + i] for i in range(len(items))]
    by_subset: dict[str, list[bool]] = {}
    for it, ok in zip(items, right):
        by_subset.setdefault(it.subset or "all", []).append(ok)
    return {
        "count": len(items),
        "accuracy": sum(right) / len(right),
        "accuracy_by_subset": {k: sum(v) / len(v) for k, v in sorted(by_subset.items())},
    }


def _heldout_metrics(pm, heldout: list[Comparison]) -> dict:
    from ..preference_model import calibration

    if not heldout:
        return {"count": 0, "accuracy": None, "ece": None, "bins": [], "note": "no held-out comparisons (raise train-pm.heldout or label more pairs)"}
    scores = pm.score([c.messages for c in heldout] * 2, [c.chosen for c in heldout] + [c.rejected for c in heldout])
    n = len(heldout)
    return calibration(scores[:n], scores[n:], [c.p_chosen for c in heldout])


def _card(base: str, counts: dict, cfg: Config, steps: int, metrics: dict) -> str:
    held, mc = metrics["heldout"], metrics.get("mc")
    lines = [
        "# Preference model (`cai train-pm`)",
        "",
        "A Constitutional AI preference model (Bai et al. 2022, §4.1): the base model with a scalar head,",
        "trained on AI-feedback soft labels p_chosen with loss -[p·log σ(r_c - r_r) + (1 - p)·log σ(r_r - r_c)].",
        "",
        f"- base model: `{base}`",
        f"- comparisons: {counts['train']} AI-labelled for training, {counts['helpful']} helpfulness, "
        f"{counts['heldout']} held out, {counts['skipped']} skipped (longer than {cfg.max_length} tokens)",
        f"- settings: {steps} steps, learning rate {cfg.learning_rate}, batch {cfg.batch_size} x {cfg.grad_accum} accumulation, "
        f"max length {cfg.max_length}, dtype {cfg.dtype}, seed {cfg.seed}",
        f"- held-out agreement with the labeler: {held['accuracy']:.3f} on {held['count']} comparisons, "
        f"expected calibration error {held['ece']:.4f}" if held["count"] else "- held-out agreement: n/a (no held-out comparisons)",
    ]
    if mc:
        subsets = ", ".join(f"{k} {v:.3f}" for k, v in mc["accuracy_by_subset"].items())
        lines.append(f"- accuracy on {mc['count']} comparison items (`{cfg.mc}`): {mc['accuracy']:.3f} ({subsets})")
    lines += [
        "",
        "```python",
        "from constitutional.preference_model import PreferenceModel",
        "pm = PreferenceModel.from_pretrained(\"<this directory>\")",
        "pm.score([\"How do I bake bread?\"], [\"Mix flour, water, yeast and salt ...\"])",
        "```",
        "",
    ]
    return "\n".join(lines)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put `tmp` at `final`; an older `final` is moved aside first and deleted after."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _inputs(cfg: Config, run_dir: RunDir) -> tuple[list[Comparison], list[Comparison], list[Comparison], list]:
    """(train, held-out, helpful comparisons, mc items), every input checked before a model loads."""
    if not 0 <= cfg.heldout < 1:
        raise UserError(f"train-pm.heldout {cfg.heldout}: must be in [0, 1)")
    report_targets(cfg.report_to, "train-pm.report_to")
    pref_path = Path(cfg.preferences) if cfg.preferences else run_dir.path / "label" / "preferences.jsonl"
    if not pref_path.is_file():
        raise UserError(f"{pref_path}: preferences not found; run `cai label` first or set train-pm.preferences")
    comparisons = read_comparisons(pref_path)
    # Held out: comparisons on test-split prompts, plus a `heldout` share of the rest chosen by a
    # hash of the id salted with "pm:" (the prompt split uses the unsalted hash, so without the salt
    # every train prompt's comparison would land in train again).
    out = [c.split == "test" or split_of(f"pm:{c.id}", cfg.heldout) == "test" for c in comparisons]
    train = [c for c, held in zip(comparisons, out) if not held]
    heldout = [c for c, held in zip(comparisons, out) if held]
    helpful: list[Comparison] = []
    if cfg.helpful:
        if not Path(cfg.helpful).is_file():
            raise UserError(f"{cfg.helpful}: helpfulness comparisons not found; check train-pm.helpful or set it to \"\"")
        helpful = read_comparisons(Path(cfg.helpful), default_p=1.0)
    if not train + helpful:
        raise UserError(
            f"{pref_path}: no training comparisons ({len(comparisons)} records, {len(heldout)} in the test split); "
            "label more pairs or add helpfulness comparisons with train-pm.helpful"
        )
    return train, heldout, helpful, _mc_pairs(cfg.mc) if cfg.mc else []


def _training_args(cfg: Config, output_dir: Path, plan):
    import torch
    from trl import RewardConfig

    from ..backends.hf import resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_dtype(cfg.dtype, device)
    return RewardConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size // plan.micro_batches,
        gradient_accumulation_steps=cfg.grad_accum * plan.micro_batches,
        max_length=cfg.max_length,
        # Weights stay float32 (AdamW updates at small learning rates vanish in bf16); bf16/fp16 is autocast.
        model_init_kwargs={"dtype": torch.float32, "use_safetensors": True},
        bf16=precision == torch.bfloat16,
        fp16=precision == torch.float16,
        activation_checkpointing=plan.checkpointing,  # TRL's default: on
        activation_checkpointing_kwargs={"use_reentrant": False} if plan.checkpointing else None,
        # transformers' LengthGroupedSampler: random megabatches of 50 batches, sorted by length within
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        save_strategy="steps" if cfg.save_steps > 0 else "no",
        save_steps=max(cfg.save_steps, 1),
        save_total_limit=1,
        logging_steps=1,
        report_to=report_targets(cfg.report_to),
        run_name=f"{output_dir.parent.parent.name}/{STAGE}",
        seed=cfg.seed,
        use_cpu=device.type == "cpu",  # transformers refuses bf16 on a CPU unless told it is one
        dataloader_pin_memory=device.type == "cuda",
    )


def build_trainer(cfg: Config, base: str, tokenizer, rows: list[dict], ckpt_dir: Path):
    """The `SoftLabelRewardTrainer` on preference `rows`, checkpointing into `ckpt_dir`; comparisons
    longer than max_length are dropped (TRL). Micro-batches and gradient checkpointing follow
    `plan_step` for a batch of the widest comparisons (TRL's loss is a batch mean, so equal
    micro-batches accumulate the whole batch's gradient); `trainer.speed_facts` holds the decisions."""
    import torch
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ..backends.hf import resolve_dtype
    from ..preference_model import SoftLabelRewardTrainer, row_width

    config = AutoConfig.from_pretrained(base, num_labels=1)
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForSequenceClassification.from_config(config).parameters())
    widths = [row_width(tokenizer, r) for r in rows]
    bf16 = resolve_dtype(cfg.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu")) == torch.bfloat16
    plan = plan_step(cfg.gradient_checkpointing, config, [min(w, 2 * cfg.max_length) for w in widths], cfg.batch_size, True, bf16, params,
                     params, "train-pm.gradient_checkpointing", held=4 * params, limit_mb=cfg.memory_mb)
    trainer = SoftLabelRewardTrainer(
        model=base, args=_training_args(cfg, ckpt_dir, plan), train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    skip_final_checkpoint(trainer)
    if len(trainer.train_dataset) == 0:
        raise UserError(f"all {len(rows)} training comparisons are longer than max_length={cfg.max_length} tokens; raise train-pm.max_length")
    # a comparison's batch row width (chosen and rejected are padded together), for the length-grouped sampler
    trainer.train_dataset = trainer.train_dataset.map(lambda e: {"length": max(len(e["chosen_ids"]), len(e["rejected_ids"]))})
    trainer.speed_facts = plan.facts
    return trainer


def run(cfg: Config, run_dir: RunDir) -> dict:
    from transformers import AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint

    from ..backends import model_path
    from ..backends.hf import resolve_dtype
    from ..preference_model import PreferenceModel, preference_row

    checkpointing_setting(cfg.gradient_checkpointing, "train-pm.gradient_checkpointing")
    train, heldout, helpful, mc_items = _inputs(cfg, run_dir)
    base = model_path(resolve_model(cfg.model, run_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {base!r}: cannot load its tokenizer ({first[:200]}); use `embedded`, a local model directory or a hub id") from None
    out = run_dir.stage_dir(STAGE)
    ckpt_dir, tmp = out / "checkpoints", out / ".model.tmp"
    with distributed.main_first() as main:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # a save cut short by a crash
    rows = [preference_row(tokenizer, c.messages, c.chosen, c.rejected, c.p_chosen) for c in train + helpful]
    with tracking(cfg.report_to, out, "train-pm.report_to"):
        trainer = build_trainer(cfg, base, tokenizer, rows, ckpt_dir)
        n_trained, speed_facts = len(trainer.train_dataset), trainer.speed_facts  # TRL drops comparisons longer than max_length
        last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
        start_step = int(last.rsplit("-", 1)[1]) if last else 0
        # The baseline for the trained PM's metrics: the same model with its fresh (random) head.
        # Not measured on a resume (the initial head is gone); train mode is restored by train().
        untrained = None
        if not last and distributed.is_main():
            pm0 = PreferenceModel(trainer.model, tokenizer, batch_size=cfg.batch_size, name="untrained")
            untrained = {"heldout": _heldout_metrics(pm0, heldout)}
            if mc_items:
                untrained["mc"] = _mc_metrics(pm0, mc_items)
            del pm0
        t0 = time.time()
        trainer.train(resume_from_checkpoint=last)
        seconds = time.time() - t0
    steps, log_history = trainer.state.global_step, trainer.state.log_history
    speed_facts.update(speed(seconds, steps - start_step, trainer._total_train_tokens))  # TRL's count of real tokens, all processes
    trainer.save_model(str(tmp))  # every process takes part (FSDP/DeepSpeed gather the weights); the main one writes
    if not distributed.is_main():
        return {}  # the main process measures, writes and reports
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the model directory holds safetensors and JSON only

    # One process holds the whole trained model: measure it in memory, in the scoring dtype (as
    # from_pretrained(tmp, dtype) would load it); sharded weights are loaded back from disk.
    model = trainer.model if distributed.world_size() == 1 else None
    del trainer  # its optimizer state
    gc.collect()
    if model is not None:
        pm = PreferenceModel(model.to(resolve_dtype(cfg.dtype, next(model.parameters()).device)), tokenizer, batch_size=cfg.batch_size, name=str(tmp))
    else:
        pm = PreferenceModel.from_pretrained(tmp, dtype=cfg.dtype, batch_size=cfg.batch_size)
    counts = {"train": len(train), "helpful": len(helpful), "heldout": len(heldout), "skipped": len(rows) - n_trained}
    metrics = {"comparisons": counts, "heldout": _heldout_metrics(pm, heldout)}
    if mc_items:
        metrics["mc"] = _mc_metrics(pm, mc_items)
    metrics["untrained"] = untrained
    atomic_write_text(tmp / "README.md", _card(base, counts, cfg, steps, metrics))
    _replace_dir(tmp, out / "model")
    atomic_write_json(out / "loss.json", log_history)
    atomic_write_json(out / "metrics.json", metrics)
    shutil.rmtree(ckpt_dir, ignore_errors=True)

    losses = [h["loss"] for h in log_history if "loss" in h]
    held, mc = metrics["heldout"], metrics.get("mc")
    return {
        "model": str(out / "model"),
        "base_model": base,
        "train_comparisons": len(train),
        "heldout_comparisons": len(heldout),
        "helpful_comparisons": len(helpful),
        "skipped_too_long": counts["skipped"],
        "steps": steps,
        "final_loss": round(losses[-1], 4) if losses else None,
        "seconds": round(seconds, 2),
        **speed_facts,
        "heldout_accuracy": round(held["accuracy"], 4) if held["count"] else None,
        "heldout_ece": round(held["ece"], 4) if held["count"] else None,
        "mc_accuracy": round(mc["accuracy"], 4) if mc else None,
        # the same metrics of the untrained PM (fresh head): what training added
        "heldout_accuracy_untrained": round(untrained["heldout"]["accuracy"], 4) if untrained and held["count"] else None,
        "mc_accuracy_untrained": round(untrained["mc"]["accuracy"], 4) if untrained and mc else None,
    }
