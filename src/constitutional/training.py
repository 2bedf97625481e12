"""Shared pieces of the training stages (`sft`, `train-pm`, `rl`, `distill`): the model to train,
LoRA, the training dtype, experiment tracking, checkpoints, and the atomic save of the trained model.

Experiment tracking (`report_to`: none, tensorboard, wandb or both, comma-separated) goes through
transformers' own integrations: the TRL trainers get `report_to` in their arguments, and distill's
loop drives the same callbacks (`LoopLogger`), so every stage logs the same `train/*` scalars.
Inside `tracking(...)` TensorBoard writes to `<run>/<stage>/logs/` and wandb keeps its files under
`<run>/<stage>/wandb/` (unless TENSORBOARD_LOGGING_DIR / WANDB_DIR say otherwise), one wandb run per
stage. W&B needs its server: unless WANDB_MODE=offline, a server that cannot be reached is a
one-line error before any model loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from .errors import UserError
from .memory import rss


def load_causal_lm(spec: str, setting: str):
    """(model in float32, tokenizer) of a model string to train; `setting` (e.g. "sft.model") names
    the config field in the one-line errors. The tokenizer must have a chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .backends import model_path

    path = model_path(spec)
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise UserError(f"{setting} {spec!r}: directory not found; give a local model directory, a hub id or embedded")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"{setting} {spec!r}: cannot load {path} ({first}); "
                        "give a local model directory with safetensors weights, a hub id or embedded") from None
    if not tokenizer.chat_template:
        raise UserError(f"{setting} {spec!r}: the tokenizer has no chat template; training on chat prompts needs one")
    return model, tokenizer


def trainer_args(checkpoint_dir, dtype: str, save_steps: int, seed: int, report_to: str = "none") -> dict:
    """The TRL/transformers training arguments the TRL stages share: float32 weights with bf16
    autocast when `dtype` (a `training_dtype`) is bfloat16, a log line per step, the trackers of
    `report_to` (`report_targets`; run name `<run>/<stage>`), one checkpoint kept every
    `save_steps`, seeded data order. `checkpoint_dir` is `<run>/<stage>/checkpoints`."""
    import torch

    checkpoint_dir = Path(checkpoint_dir)
    return dict(
        output_dir=str(checkpoint_dir),
        bf16=dtype == "bfloat16",
        fp16=False,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        report_to=report_targets(report_to),
        run_name=f"{checkpoint_dir.parent.parent.name}/{checkpoint_dir.parent.name}",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
    )


TRACKERS = ("tensorboard", "wandb")
_OFFLINE = ("offline", "disabled", "dryrun")


def report_targets(spec: str, setting: str = "report_to") -> list[str]:
    """`none`, `tensorboard`, `wandb` or `tensorboard,wandb` -> transformers' `report_to` list.
    `setting` (e.g. "sft.report_to") names the field in the one-line errors: an unknown tracker, a
    missing package, or a W&B server that cannot be reached while WANDB_MODE is not offline."""
    names = [t.strip() for t in str(spec).split(",") if t.strip() and t.strip() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{setting} {spec!r}: unknown tracker {name!r}; use none, tensorboard, wandb or tensorboard,wandb")
        try:
            __import__(name)
        except ImportError:
            raise UserError(f"{setting} {name}: the {name} package is not installed; pip install {name} "
                            "(or pip install 'constitutional[tracking]')") from None
    if "wandb" in names and os.environ.get("WANDB_MODE", "").lower() not in _OFFLINE:
        url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        parsed = urlparse(url)
        try:
            socket.create_connection((parsed.hostname or url, parsed.port or (80 if parsed.scheme == "http" else 443)), timeout=5).close()
        except OSError as e:
            raise UserError(f"{setting} wandb: cannot reach the W&B server {url} ({e.strerror or type(e).__name__}); "
                            "set WANDB_MODE=offline to keep the run on disk and `wandb sync` it later, or use tensorboard") from None
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def tracking(report_to: str, stage_dir: Path, setting: str = "report_to"):
    """The scope of one stage's training for its trackers: TensorBoard event files go to
    `<stage_dir>/logs/` and wandb's files to `<stage_dir>/wandb/` (unless TENSORBOARD_LOGGING_DIR
    or WANDB_DIR is set), and the stage's wandb run is finished at the end. Build the trainer inside it
    (transformers' TensorBoard callback reads its directory when the trainer is made)."""
    targets = report_targets(report_to, setting)
    env = {}
    if "tensorboard" in targets and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        env["TENSORBOARD_LOGGING_DIR"] = str(Path(stage_dir) / "logs")
    if "wandb" in targets and not os.environ.get("WANDB_DIR"):
        env["WANDB_DIR"] = str(stage_dir)
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield targets
    finally:
        if "wandb" in targets:
            import wandb

            if wandb.run is not None:
                wandb.finish()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LoopLogger:
    """transformers' tracker callbacks (the ones `report_to` names) for a training loop of our own
    (distill): `log(step, {"loss": ..., "learning_rate": ...})` per step, `close()` at the end.
    Use inside `tracking(...)`."""

    def __init__(self, targets: list[str], stage_dir: Path, model=None):
        self.callbacks = []
        if not targets:
            return
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        stage_dir = Path(stage_dir)
        self.args = TrainingArguments(output_dir=str(stage_dir / "checkpoints"), report_to=targets, logging_steps=1,
                                      run_name=f"{stage_dir.parent.name}/{stage_dir.name}")
        self.state, self.control = TrainerState(), TrainerControl()
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks(targets)]
        for cb in self.callbacks:
            cb.on_train_begin(self.args, self.state, self.control, model=model)

    def log(self, step: int, logs: dict) -> None:
        if not self.callbacks:
            return
        self.state.global_step = step
        for cb in self.callbacks:
            cb.on_log(self.args, self.state, self.control, logs=dict(logs))

    def close(self) -> None:
        for cb in self.callbacks:
            cb.on_train_end(self.args, self.state, self.control)


def lora_config(r: int, alpha: int):
    """LoRA on all linear layers of the blocks (peft leaves out the output head, which TRL requires)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def training_dtype(spec: str) -> str:
    """`auto` -> bfloat16 where the GPU or CPU computes in bf16 natively, else float32."""
    import torch

    if spec in ("bfloat16", "float32"):
        return spec
    if spec != "auto":
        raise UserError(f"dtype {spec!r}: use auto, bfloat16 or float32")
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    from .backends.hf import cpu_supports_bf16

    return "bfloat16" if cpu_supports_bf16() else "float32"


def skip_final_checkpoint(trainer) -> None:
    """No checkpoint at the last step: the stage saves the trained model itself right after
    `train()`, and transformers' checkpoint there (weights, AdamW's moments, RNG state: 1.6 GB on
    a 135M model, 8-25 s to write on our 2-core machine) would be deleted unread. A crash between the last step
    and that save resumes from the checkpoint before, which trains the same steps again."""
    from transformers import TrainerCallback

    class _SkipFinal(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                control.should_save = False

    trainer.add_callback(_SkipFinal())


def last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (its trainer_state.json is written last), or None."""
    done = []
    for d in checkpoint_dir.glob("checkpoint-*"):
        try:
            step = int(d.name.split("-", 1)[1])
            json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            continue
        done.append((step, d))
    return max(done)[1] if done else None


def keep_matching_checkpoints(out: Path, stamp: Path, fingerprint: str, stage: str, what: str) -> None:
    """Before training into `out`: drop the temp folder of a save killed half-way, and the checkpoints
    (the folder holding `stamp`) when they were trained on other inputs than `fingerprint` says
    (`what` names those inputs in the message); then stamp the checkpoints with `fingerprint`.
    Called by the main process only (distributed.main_first)."""
    from .run import atomic_write_text

    for stale in out.glob(".model.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    checkpoint_dir = stamp.parent
    if checkpoint_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        print(f"[{stage}] {checkpoint_dir} belongs to other {what}; starting over", file=sys.stderr)
        shutil.rmtree(checkpoint_dir)
    atomic_write_text(stamp, fingerprint + "\n")


def save_model(trainer, target: Path, card: str) -> None:
    """Write the trained (LoRA-merged) model, tokenizer and card to `target` via a temp dir + rename.

    Under several processes every rank must call this: `trainer.save_model` gathers sharded weights
    (FSDP, DeepSpeed ZeRO-3) and only the main process writes; the rename happens on the main one.
    """
    from . import distributed

    tmp = target.parent / f".{target.name}.tmp-save"
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save killed half-way
    distributed.barrier()
    try:
        peft = hasattr(trainer.model, "merge_and_unload")
        if peft or not hasattr(trainer, "save_model"):  # a LoRA adapter to merge, or our own loop (distill)
            model = trainer.model.merge_and_unload() if peft else trainer.model
            if distributed.is_main():
                model.save_pretrained(str(tmp))
                trainer.processing_class.save_pretrained(str(tmp))
        else:
            trainer.save_model(str(tmp))  # model and tokenizer; every rank takes part, the main one writes
        if distributed.is_main():
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the model directory holds safetensors and JSON
            (tmp / "README.md").write_text(card, encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()


# ------------------------------------------------------------------ memory and speed


def activation_bytes(config, tokens: int, bf16: bool, params: int, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for the backward pass of one forward (and loss) over `tokens` tokens of
    a Llama-style decoder. config: hidden_size h, intermediate_size I, num_hidden_layers L,
    num_key_value_heads x head_dim = kv, vocab_size V.

    Counted per token, from the tensors transformers' Llama modules save for backward (measured with
    `torch.autograd.graph.saved_tensors_hooks` on random Llamas of several widths, 256 tokens, and
    fitted; tests/unit/test_training.py checks it against that measurement):
    - float32: L·4·(8h + 4I + 2kv) + 4V + 14h bytes: per layer the norms' inputs and outputs, q, k,
      v before and after the rotary embedding, the attention output, the MLP's gate, up and product;
      4V is the log-softmax of the logits in float32;
    - bf16 autocast: L·(30h + 8I + 4kv) + 6V + 13h bytes (the norms and the residual stream stay
      float32), plus the bf16 copies of the weights autocast keeps for backward, 2 bytes for each
      of the model's `params` parameters;
    - `checkpointing` (one checkpoint per layer): the layers keep only their input, 4h bytes each,
      and one layer's activations exist at a time while it is recomputed.
    On SmolLM2-135M's shape, 512 tokens: 789 MB float32 (measured 753), 891 MB bf16 (measured 800).
    TRL's fused LM head tiles the logits, so for TRL trainers the V term over-counts: the estimate
    errs towards more memory.
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, inter, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * (getattr(c, "head_dim", None) or h // heads)
    if bf16:
        layer, rest = 30 * h + 8 * inter + 4 * kv, 6 * vocab + 13 * h
    else:
        layer, rest = 4 * (8 * h + 4 * inter + 2 * kv), 4 * vocab + 14 * h
    per_token = (layers * 4 * h + layer if checkpointing else layers * layer) + rest
    weight_copies = 2 * params if bf16 else 0
    return tokens * per_token + weight_copies


def free_memory(device) -> int:
    """Bytes that can still be allocated on `device` ("cuda" or "cpu"): the GPU's free memory, or
    the machine's available memory (less under a cgroup v2 memory limit)."""
    import psutil
    import torch

    if str(device) == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return int(free)


def checkpointing_setting(value: str, setting: str) -> str:
    """auto / on / off (true and false read as on and off), else a `UserError`."""
    v = str(value).strip().lower()
    v = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}.get(v, v)
    if v not in ("auto", "on", "off"):
        raise UserError(f"{setting} {value!r}: use auto (on only when the activations would not fit), on or off")
    return v


@dataclass
class StepPlan:
    """How a training step runs: its batch in `micro_batches` equal parts (gradient accumulation:
    the same examples and optimizer steps, the gradient of the whole batch), and whether the layers'
    activations are recomputed in the backward pass. `facts` go into the stage summary."""

    micro_batches: int
    checkpointing: bool
    facts: dict


def plan_step(setting: str, config, lengths: Sequence[int], batch: int, padded: bool, bf16: bool, params: int, trainable: int,
              name: str, held: int = 0, limit_mb: int = 0) -> StepPlan:
    """Micro-batches and gradient checkpointing for a step over `batch` sequences, decided by memory.

    The worst step takes the `batch` longest of the training sequences' token `lengths`: padded,
    batch x the longest; padding-free, their sum. A step needs, besides what the process holds now
    (its RSS: libraries, what earlier work left, the part of the weights already paged in):
    `held` bytes for the models' weights (those loaded lazily are not resident yet), 12 bytes per
    `trainable` parameter for the gradients and AdamW's two moments, and the activations
    (`activation_bytes`, which counts the bf16 weight copies autocast keeps). The budget is
    `limit_mb` (the process's memory, MB), or else its RSS plus the machine's free memory; a plan
    fits when the step's needs stay within 80% of what the budget leaves. Tried in order: 1, 2, ...
    micro-batches (each divides `batch`) without checkpointing, then the same with it (`setting`
    on or off keeps only one of the two; auto tries both, as TRL's default, always on, only costs
    time on a small model). If nothing fits, the most frugal plan and a warning.
    `name` is the config field (e.g. "sft.gradient_checkpointing") for the messages.
    """
    import sys

    choice = checkpointing_setting(setting, name)
    now = rss()
    budget = limit_mb * 2**20 if limit_mb > 0 else now + free_memory("cuda" if _on_cuda() else "cpu")
    room = 0.8 * (budget - now)
    longest = sorted(lengths, reverse=True)
    fixed = held + 12 * trainable
    options = [(m, ckpt) for ckpt in ((False, True) if choice == "auto" else (choice == "on",)) for m in range(1, batch + 1) if batch % m == 0]
    for m, ckpt in options:
        micro = batch // m
        tokens = micro * longest[0] if padded else sum(longest[:micro])
        need = fixed + activation_bytes(config, tokens, bf16, params, checkpointing=ckpt)
        if need <= room:
            break
    stage = name.split(".")[0]
    facts = {"micro_batches": m, "gradient_checkpointing": ckpt, "step_memory_mb_estimate": round(need / 2**20),
             "memory_budget_mb": round(budget / 2**20)}
    if need > room:
        print(f"[{stage}] warning: a step needs ~{need / 2**20:.0f} MB beyond the {now / 2**20:.0f} MB held, more than 80% of the "
              f"{(budget - now) / 2**20:.0f} MB left of the budget, even in {m} micro-batches with checkpointing; it may not fit", file=sys.stderr)
    elif choice == "auto" or m > 1:
        print(f"[{stage}] batch of {batch} in {m} micro-batch{'es' if m > 1 else ''}, gradient checkpointing {'on' if ckpt else 'off'}: "
              f"a step needs ~{need / 2**20:.0f} MB beyond the {now / 2**20:.0f} MB held, budget {budget / 2**20:.0f} MB", file=sys.stderr)
    return StepPlan(m, ckpt, facts)


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def speed(seconds: float, steps: int, tokens: int) -> dict:
    """The training summary's speed: seconds per optimizer step and trained tokens per second (the
    real, non-padding tokens of the batches, summed over processes), over this run's steps only."""
    return {"seconds_per_step": round(seconds / max(1, steps), 3), "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None}
