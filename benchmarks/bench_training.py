"""Training speed of each training stage's settings against TRL's defaults, same data, same run.

    python benchmarks/bench_training.py [--model embedded] [--stages sft,train-pm,rl,distill] [--steps 6] [--repeats 1]
                                        [--budget-mb 4000] [--name NAME]

For sft, train-pm, rl and distill, the stage's own trainer (its `build_trainer`, or distill's loop)
is built twice on the same examples, seed and settings (the quickstart's batch sizes, bf16 autocast
where the CPU has it), differing only in what this project decides against TRL's defaults:
- ours: micro-batches and gradient checkpointing by memory (`training.plan_step`, the machine's
  free memory: one batch, no checkpointing, on a 135M model), sft padding-free batches, train-pm
  and distill length-grouped batches, rl rollouts through the hf backend (`rollouts.py`);
- budget (with `--budget-mb`): ours with `memory_mb` set (the quickstart's 4000): what the plan
  then chooses, and what it costs;
- trl: gradient checkpointing on (TRL's default), padded batches in random order, rl rollouts
  through HF `generate`.
Each configuration trains `--steps` optimizer steps in its own subprocess (so each has its own
peak RSS); the first step is a warm-up and is not timed. Configurations alternate, `--repeats`
times, and the fastest repeat of each counts. Reported per stage: s/step, trained tokens/s (real,
non-padding tokens: TRL's own count; rl: prompt + completion tokens of the rollouts), peak RSS,
and the ratios ours vs trl. rl's reward is a cheap stand-in (the share of vowels) so the ratio
measures training, not the preference model.
Data: the built-in multiple-choice items (question, correct and incorrect response) as SFT pairs,
PM comparisons and distill's "teacher samples" (no sampling before training); rl samples its own
completions to the built-in red-team prompts. Writes `benchmarks/results/training_<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("sft", "train-pm", "rl", "distill")


def mc_items():
    from constitutional.data.loaders import load_mc

    return [it for it in load_mc("builtin:mc") if {"question", "correct_response", "incorrect_response"} <= set(it.meta)]


def step_timer():
    """A TrainerCallback that records each optimizer step's seconds and the trainer's token count."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.trainer, self.steps = None, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.perf_counter(), self.tokens()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append((time.perf_counter() - self.t0, self.tokens() - self.tok0))

        def tokens(self):  # sft/train-pm: TRL's count of real tokens; rl: the rollouts' prompt + completion tokens
            return getattr(self.trainer, "_total_train_tokens", 0) + self.trainer.state.num_input_tokens_seen

    return Timer()


def run_trainer(trainer) -> list[tuple[float, int]]:
    timer = step_timer()
    timer.trainer = trainer
    trainer.add_callback(timer)
    trainer.train()
    return timer.steps


def bench_sft(model: str, ours: bool, steps: int, work: Path, memory_mb: int):
    from constitutional.stages import sft

    rows = [{"prompt": [{"role": "user", "content": it.meta["question"]}], "completion": [{"role": "assistant", "content": it.meta["correct_response"]}]}
            for it in mc_items()]
    cfg = sft.Config(model=model, batch_size=4, max_steps=steps, learning_rate=5e-5, save_steps=10**6,
                     padding_free=ours, gradient_checkpointing="auto" if ours else "on", memory_mb=memory_mb)
    trainer = sft.build_trainer(cfg, rows, work / "ckpt")
    return run_trainer(trainer), trainer.speed_facts


def bench_pm(model: str, ours: bool, steps: int, work: Path, memory_mb: int):
    from transformers import AutoTokenizer

    from constitutional.backends import model_path
    from constitutional.preference_model import preference_row
    from constitutional.stages import preference

    base = model_path(model)
    tok = AutoTokenizer.from_pretrained(base)
    rows = [preference_row(tok, it.meta["question"], it.meta["correct_response"], it.meta["incorrect_response"], 1.0) for it in mc_items()]
    cfg = preference.Config(model=model, batch_size=4, max_steps=steps, save_steps=0, group_by_length=ours,
                            gradient_checkpointing="auto" if ours else "on", memory_mb=memory_mb)
    trainer = preference.build_trainer(cfg, base, tok, rows, work / "ckpt")
    return run_trainer(trainer), {**trainer.speed_facts, "group_by_length": ours}


def vowel_share(prompts, responses):
    return [sum(ch in "aeiouAEIOU" for ch in t) / max(1, len(t)) for t in responses]


def bench_rl(model: str, ours: bool, steps: int, work: Path, memory_mb: int):
    from constitutional.run import RunDir
    from constitutional.stages import rl

    cfg = rl.Config(policy=model, num_generations=4, batch_size=2, max_steps=steps, learning_rate=1e-5, beta=0.05, temperature=0.7,
                    max_new_tokens=48, save_steps=10**6, eval_prompts=0, rollouts="backend" if ours else "trl",
                    gradient_checkpointing="auto" if ours else "on", memory_mb=memory_mb)
    rows, _ = rl.training_prompts(cfg, RunDir(work / "run"))
    trainer = rl.build_trainer(cfg, rows, model, rl.PolicyReward(vowel_share, True, 0.0), work / "ckpt")
    return run_trainer(trainer), trainer.speed_facts


def bench_distill(model: str, ours: bool, steps: int, work: Path, memory_mb: int):
    from constitutional.backends import load_backend
    from constitutional.backends.prompted import PromptedBackend
    from constitutional.context import load_context
    from constitutional.stages import distill
    from constitutional.training import plan_step, training_dtype

    cfg = distill.Config(model=model, batch_size=4, max_steps=steps, save_steps=10**6, group_by_length=ours, memory_mb=memory_mb)
    backend = load_backend(model, dtype=cfg.dtype, batch_size=cfg.batch_size)
    teacher_backend = PromptedBackend(backend, load_context(cfg.context))
    records = [{"id": it.id, "prompt_id": it.id, "split": "train", "messages": [{"role": "user", "content": it.meta["question"]}],
                "response": it.meta["correct_response"], "truncated": False} for it in mc_items()]
    examples = distill.encode_examples(backend, teacher_backend, records)
    bf16 = training_dtype(cfg.dtype) == "bfloat16"
    teacher = distill.Teacher(backend.model, examples, backend.pad_id)
    student = distill.load_student(cfg, backend.path, backend.device)
    params = sum(p.numel() for p in student.parameters())
    plan = plan_step("auto" if ours else "on", student.config, [len(e.student_ids) for e in examples], cfg.batch_size, True, bf16, params, params,
                     "distill.gradient_checkpointing", held=4 * params, limit_mb=memory_mb)
    if plan.checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    timed, step = [], distill.train_step

    def timed_step(student, optimizer, teacher, batch, *args):
        t0 = time.perf_counter()
        loss = step(student, optimizer, teacher, batch, *args)
        timed.append((time.perf_counter() - t0, sum(len(e.student_ids) for e in batch)))
        return loss

    distill.train_step = timed_step
    distill.train(cfg, student, teacher, examples, backend.pad_id, bf16, work / "ckpt", "bench", plan.micro_batches)
    return timed, {**plan.facts, "group_by_length": ours}


BENCH = {"sft": bench_sft, "train-pm": bench_pm, "rl": bench_rl, "distill": bench_distill}


def worker(stage: str, config: str, model: str, steps: int, budget_mb: int, out: Path) -> None:
    with tempfile.TemporaryDirectory() as work:
        per_step, facts = BENCH[stage](model, config != "trl", steps, Path(work), budget_mb if config == "budget" else 0)
    timed = per_step[1:]  # the first step warms up (allocations, kernels)
    seconds, tokens = sum(s for s, _ in timed), sum(t for _, t in timed)
    out.write_text(json.dumps({
        "stage": stage, "config": config, "steps_timed": len(timed), "seconds_per_step": seconds / len(timed),
        "tokens_per_second": tokens / seconds, "tokens_per_step": tokens / len(timed),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "settings": facts,
        "per_step": [[round(s, 3), t] for s, t in per_step],
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration (the first is not timed)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--budget-mb", type=int, default=0, help="also run ours with this memory_mb (0 = no such run)")
    ap.add_argument("--name", default="cpu")
    ap.add_argument("--worker", nargs=3, metavar=("STAGE", "CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        stage, config, out = args.worker
        return worker(stage, config, args.model, args.steps, args.budget_mb, Path(out))

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            configs = ("ours", "trl") + (("budget",) if args.budget_mb else ())
            runs = {c: [] for c in configs}
            for rep in range(args.repeats):
                for config in (configs if rep % 2 == 0 else configs[::-1]):
                    out = Path(tmp) / f"{stage}-{config}-{rep}.json"
                    cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--budget-mb", str(args.budget_mb),
                           "--worker", stage, config, str(out)]
                    t0 = time.time()
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    runs[config].append({**json.loads(out.read_text()), "wall_seconds": round(time.time() - t0, 1)})
                    r = runs[config][-1]
                    print(f"{stage:8s} {config:6s} {r['seconds_per_step']:7.2f} s/step {r['tokens_per_second']:8.1f} tokens/s "
                          f"{r['peak_rss_mb']:6d} MB peak  {r['settings']}", flush=True)
            best = {c: min(rs, key=lambda r: r["seconds_per_step"]) for c, rs in runs.items()}
            results[stage] = {
                **best, "repeats": runs,
                "s_per_step_trl_over_ours": round(best["trl"]["seconds_per_step"] / best["ours"]["seconds_per_step"], 3),
                "tokens_per_s_ours_over_trl": round(best["ours"]["tokens_per_second"] / best["trl"]["tokens_per_second"], 3),
                "peak_rss_ours_over_trl": round(best["ours"]["peak_rss_mb"] / best["trl"]["peak_rss_mb"], 3),
            }
            if "budget" in best:
                results[stage]["s_per_step_trl_over_budget"] = round(best["trl"]["seconds_per_step"] / best["budget"]["seconds_per_step"], 3)
    print("\nstage     s/step ours   trl   speed-up   tokens/s ours   trl   ratio   peak MB ours   trl   budget: s/step  speed-up  peak MB")
    for stage, r in results.items():
        o, t, b = r["ours"], r["trl"], r.get("budget")
        print(f"{stage:8s} {o['seconds_per_step']:10.2f} {t['seconds_per_step']:6.2f} {r['s_per_step_trl_over_ours']:8.2f}x "
              f"{o['tokens_per_second']:14.1f} {t['tokens_per_second']:6.1f} {r['tokens_per_s_ours_over_trl']:6.2f}x "
              f"{o['peak_rss_mb']:12d} {t['peak_rss_mb']:5d}"
              + (f"  {b['seconds_per_step']:14.2f} {r['s_per_step_trl_over_budget']:8.2f}x {b['peak_rss_mb']:8d}" if b else ""))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"training_{args.name}.json"
    path.write_text(json.dumps({
        "model": args.model, "steps": args.steps, "repeats": args.repeats, "budget_mb": args.budget_mb, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"), "stages": results,
    }, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
