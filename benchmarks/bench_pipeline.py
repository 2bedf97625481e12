"""Generation speed of the pipeline's generation stages against two references, in one run.

    python benchmarks/bench_pipeline.py [--baseline-rev 00fcaee] [--model embedded] [--out benchmarks/results/pipeline_cpu.json]

One fixed small config (`CONFIG` below: the quickstart's sampling settings) runs through `cai revise`,
`cai sample` and `cai eval`, each stage in its own process, for two code versions:
- ours: this checkout's `src/`;
- the baseline: the commit before the generation scheduler (`--baseline-rev`), checked out beside
  this one with `git worktree` (lockstep batches of a fixed size, the tail of each batch decoding alone).
Each stage's generated tokens are counted by the backend itself (`stats["generated_tokens"]`, which
both versions keep) and divided by the stage's wall time (model loading included, as a user sees it).
The second reference is the backend's peak batched throughput on the same model: 64 short chat
prompts decoded together, greedy, 64 new tokens each (the rate a stage could reach if every decode
step were full). Results: a JSON file and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """\
seed: 0
model: {model}
revise:
  prompts: builtin:redteam
  split: train
  limit: 12
  helpful_limit: 6
  helpful_samples: 2
  rounds: 2
  fewshot_count: 3
  temperature: 0.7
  top_p: 0.9
  repetition_penalty: 1.2
  max_new_tokens: 160
  critique_max_new_tokens: 64
  retries: 1
sample:
  policy: {model}
  split: train
  limit: 16
  k: 2
  temperature: 0.7
  top_p: 0.9
  repetition_penalty: 1.2
  max_new_tokens: 96
eval:
  models: [base={model}, again={model}]
  feedback_model: {model}
  sections: [harmlessness, refusal]
  limit: 6
  max_new_tokens: 64
  repetition_penalty: 1.2
  fewshot: 4
  bootstrap: 50
"""

# Runs one stage in this process with every backend it loads recorded, then prints the stage's wall
# time and the tokens its backends generated. Works with both code versions (PYTHONPATH picks one).
DRIVER = r"""
import json, sys, time
import constitutional.backends as backends
created = []
orig = backends.load_backend
def load_backend(*a, **k):
    b = orig(*a, **k)
    created.append(b)
    return b
backends.load_backend = load_backend
import importlib
for where in ("registry", "base"):  # where the code version resolves model strings (prompted: models recurse there)
    try:
        module = importlib.import_module(f"constitutional.backends.{where}")
    except ImportError:
        continue
    if hasattr(module, "load_backend"):
        module.load_backend = load_backend
stage, run_dir, config = sys.argv[1:4]
import importlib
from constitutional.stages import BY_NAME
mod = importlib.import_module(f"constitutional.stages.{BY_NAME[stage].module}")
mod.load_backend = load_backend
from constitutional.cli import main
t0 = time.perf_counter()
rc = main([stage, "--run-dir", run_dir, "--config", config])
seconds = time.perf_counter() - t0
def stats(b):
    return getattr(b, "stats", None) or getattr(getattr(b, "backend", None), "stats", {}) or {}
tokens = sum(stats(b).get("generated_tokens", 0) for b in {id(b): b for b in created}.values())
print("BENCH " + json.dumps({"stage": stage, "rc": rc, "seconds": seconds, "generated_tokens": tokens}))
"""


def run_stage(src: Path, stage: str, run_dir: Path, config: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    res = subprocess.run([sys.executable, "-c", DRIVER, stage, str(run_dir), str(config)], capture_output=True, text=True, env=env)
    line = [x for x in res.stdout.splitlines() if x.startswith("BENCH ")]
    if res.returncode != 0 or not line:
        raise SystemExit(f"{stage} with {src} failed:\n{res.stderr[-3000:]}")
    out = json.loads(line[-1][6:])
    out["tokens_per_s"] = out["generated_tokens"] / out["seconds"]
    return out


def peak(model: str) -> dict:
    """The backend's batched peak: 64 short chat prompts, greedy, 64 new tokens, one running batch."""
    from constitutional.backends import GenerationParams, load_backend
    from constitutional.data.loaders import load_prompts

    b = load_backend(model, max_rows=64)
    prompts = (load_prompts("builtin:redteam", split="test") + load_prompts("builtin:helpful", split="test"))[:64]
    b.generate([p.messages for p in prompts[:2]], GenerationParams(max_new_tokens=4, temperature=0))  # warm-up
    b.stats["generated_tokens"] = 0
    t0 = time.perf_counter()
    b.generate([p.messages for p in prompts], GenerationParams(max_new_tokens=64, temperature=0))
    seconds = time.perf_counter() - t0
    return {"prompts": len(prompts), "seconds": seconds, "generated_tokens": b.stats["generated_tokens"],
            "tokens_per_s": b.stats["generated_tokens"] / seconds}


@contextlib.contextmanager
def baseline_checkout(rev: str, prefix: str):
    """(a temp dir, `rev` checked out in it with `git worktree`), both removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    base_tree = tmp / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_tree), rev], check=True)
    try:
        yield tmp, base_tree
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-rev", default="00fcaee", help="the commit to compare against (before the scheduler)")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--stages", default="revise,sample,eval")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline_cpu.json"))
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    with baseline_checkout(args.baseline_rev, "cai-bench-pipeline-") as (tmp, base_tree):
        config = tmp / "bench.yaml"
        config.write_text(CONFIG.format(model=args.model))
        results = {"peak": peak(args.model), "stages": {}}
        for stage in stages:  # the two versions alternate stage by stage, so drift hits both alike
            row = {}
            for name, src in (("baseline", base_tree / "src"), ("ours", ROOT / "src")):
                row[name] = run_stage(src, stage, tmp / f"run-{name}", config)
            row["speedup"] = row["baseline"]["seconds"] / row["ours"]["seconds"]
            row["ours_vs_peak"] = row["ours"]["tokens_per_s"] / results["peak"]["tokens_per_s"]
            row["baseline_vs_peak"] = row["baseline"]["tokens_per_s"] / results["peak"]["tokens_per_s"]
            results["stages"][stage] = row
    import platform

    import torch

    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "baseline_rev": args.baseline_rev}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    p = results["peak"]
    print(f"peak (64 prompts decoded together, greedy, 64 tokens): {p['tokens_per_s']:.0f} tok/s")
    print(f"{'stage':8} {'baseline s':>11} {'ours s':>8} {'speed-up':>9} {'baseline tok/s':>15} {'ours tok/s':>11} {'ours/peak':>10}")
    for stage, r in results["stages"].items():
        print(f"{stage:8} {r['baseline']['seconds']:11.1f} {r['ours']['seconds']:8.1f} {r['speedup']:8.2f}x "
              f"{r['baseline']['tokens_per_s']:15.1f} {r['ours']['tokens_per_s']:11.1f} {r['ours_vs_peak']:9.0%}")


if __name__ == "__main__":
    main()
