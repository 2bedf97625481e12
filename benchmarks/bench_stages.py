"""Whole stages at this checkout against a baseline commit, side by side on the same inputs.

    python benchmarks/bench_stages.py --run runs/quickstart --baseline-rev fb6dfee
        [--config configs/quickstart.yaml] [--stages sft,train-pm,rl,dpo,distill] [--set rl.eval_prompts=0] [--name NAME]

`--run` is a finished run (e.g. of `cai quickstart`): its stage outputs are the inputs. For each stage
the two code versions take turns (baseline, then ours), each in a fresh process (its own peak RSS,
nothing left over from another stage), each on its own copy of the run with that stage's folder
removed, with the same config and seed: `python -m constitutional.cli <stage> --force`, the baseline
from a `git worktree` of `--baseline-rev` through PYTHONPATH. Reported per stage from the copy's
manifest: the stage's seconds, its training seconds and s/step where it trains, micro-batches and
gradient checkpointing, and its peak RSS; and the ratio baseline / ours. Alternating stage by stage
keeps a machine's drift (the same CPU type runs this pipeline 1.8x slower on one machine than on
another, and one machine's speed wanders within an hour) from landing on one version only.
Writes `benchmarks/results/stages_<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_pipeline import baseline_checkout  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("seconds", "seconds_train", "seconds_per_step", "micro_batches", "gradient_checkpointing", "peak_rss_mb")


def run_stage(src: Path, stage: str, run_dir: Path, config: str, sets: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "constitutional.cli", stage, "--config", config, "--run-dir", str(run_dir), "--force"]
    mine = [s for s in sets if "." not in s.split("=", 1)[0] or s.split(".", 1)[0] == stage]  # `rl.x=1` goes to rl only
    cmd += [a for s in mine for a in ("--set", s)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{stage} with {src} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"][stage]
    summary = entry.get("summary") or {}
    return {"wall": round(wall, 1), "stage_seconds": entry.get("seconds"), **{k: summary.get(k) for k in FIELDS}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished run whose outputs are the stages' inputs")
    ap.add_argument("--baseline-rev", required=True, help="the commit to compare against")
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--stages", default="sft,train-pm,rl,dpo,distill")
    ap.add_argument("--set", action="append", default=[], help="an override passed to both versions: key=value for every stage, stage.key=value for one (rl.eval_prompts=0)")
    ap.add_argument("--name", default="cpu")
    args = ap.parse_args()
    src_run = Path(args.run).resolve()
    if not (src_run / "manifest.json").is_file():
        raise SystemExit(f"--run {args.run}: no manifest.json there; give a finished run directory")
    results: dict = {"baseline_rev": args.baseline_rev, "config": args.config, "sets": args.set, "stages": {}}
    with baseline_checkout(args.baseline_rev, "cai-bench-stages-") as (tmp, base_tree):
        for stage in [s for s in args.stages.split(",") if s]:
            row = {}
            for name, src in (("baseline", base_tree / "src"), ("ours", ROOT / "src")):
                run_dir = tmp / f"{stage}-{name}"
                shutil.copytree(src_run, run_dir, ignore=shutil.ignore_patterns(stage, f"{stage}.stale-*"))
                row[name] = run_stage(src, stage, run_dir, args.config, args.set)
                shutil.rmtree(run_dir, ignore_errors=True)
            row["speedup"] = round(row["baseline"]["stage_seconds"] / row["ours"]["stage_seconds"], 3)
            results["stages"][stage] = row
            b, o = row["baseline"], row["ours"]
            print(f"{stage:9s} baseline {b['stage_seconds']:7.1f} s (peak {b['peak_rss_mb']} MB)  ours {o['stage_seconds']:7.1f} s "
                  f"(peak {o['peak_rss_mb']} MB)  speedup {row['speedup']:.2f}x", flush=True)
    import platform

    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    out = ROOT / "benchmarks" / "results" / f"stages_{args.name}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
