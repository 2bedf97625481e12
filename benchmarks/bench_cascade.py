"""Cascade attention (`backends/hf_cascade.py`) against the copied shared prefix, side by side in one run.

    python benchmarks/bench_cascade.py [--model embedded] [--rows 12,32] [--reps 2] [--out benchmarks/results/cascade_cpu.json]

Both sides are the same `hf` backend of this checkout on the same model, with the same shared-prefix
cache; the baseline copies the prefix's KV cache into every row of the batch and attends over it
per row (what the backend did before, and still does for models `hf_cascade.supported` rejects),
ours keeps it once and reads it once per step for all rows (`cascade_ok`). Workloads:
- decode, as `cai revise` critiques: N conversations behind the built-in critique few-shot block
  (3 examples, chat template), each a red-team prompt, an answer and a critique request; sampled
  as the quickstart samples (temperature 0.7, top-p 0.9, repetition penalty 1.2), 64 new tokens;
- scoring, as `cai label` and the eval's judge: 16 comparisons of the built-in multiple-choice set,
  both orders, 4 few-shot feedback examples (`stages.label.Labeler`).
The sides alternate `--reps` times; each figure is the best of its reps (the least disturbed).
Reports tokens/s and comparisons/s, the ratio, how many sampled rows came out token-identical, the
largest log-prob difference (the two sides sum the same scores in another order), and the resident
memory the scoring adds at its peak (VmHWM reset after the heap is trimmed; the largest of the reps).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from constitutional.backends import GenerationParams, load_backend
from constitutional.constitution import load_constitution, load_fewshot
from constitutional.data.loaders import load_prompts
from constitutional.memory import current_mb, peak_mb, reset_peak, trim
from constitutional.stages.label import Labeler
from constitutional.stages.revise import fewshot_messages

from bench_label import comparisons

RESULTS = Path(__file__).resolve().parent / "results"
ANSWER = "Sure. Here is how you could do that, step by step, with the details you asked for."


def critique_conversations(n: int) -> list[list[dict]]:
    block = fewshot_messages(load_fewshot(None, "critique")[:3], with_critique=True)
    principle = load_constitution().critique_revision[0]
    prompts = load_prompts("builtin:redteam", split="train")
    return [block + p.messages + [{"role": "assistant", "content": ANSWER}, {"role": "user", "content": principle.critique}]
            for p in (prompts * (n // len(prompts) + 1))[:n]]


def decode(backend, convs, params) -> tuple[float, int, list]:
    backend.stats["generated_tokens"] = 0
    t0 = time.perf_counter()
    out = backend.generate_ids(convs, params)
    return time.perf_counter() - t0, backend.stats["generated_tokens"], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--rows", default="12,32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "cascade_cpu.json"))
    args = ap.parse_args()
    ours = load_backend(args.model, dtype="float32", max_rows=64)
    base = load_backend(args.model, dtype="float32", max_rows=64)
    base.cascade_ok = False
    assert ours.cascade_ok, f"{args.model}: cascade attention is not used for this model"
    sides = {"copied prefix": base, "cascade": ours}
    params = GenerationParams(max_new_tokens=64, temperature=0.7, top_p=0.9, repetition_penalty=1.2, seed=0)
    results: dict = {"decode": {}, "scoring": {}}
    for n in [int(x) for x in args.rows.split(",")]:
        convs = critique_conversations(n)
        prefix = len(ours._encode_chat(convs[0])) - max(len(ours._encode_chat(c)) - len(ours._encode_chat(convs[0])) for c in convs)
        for b in sides.values():
            decode(b, convs[:2], GenerationParams(max_new_tokens=2, temperature=0))  # warm-up, prefix cached
        best: dict = {}
        for _ in range(args.reps):
            for name, b in sides.items():
                secs, tokens, out = decode(b, convs, params)
                if name not in best or secs < best[name]["seconds"]:
                    best[name] = {"seconds": secs, "generated_tokens": tokens, "tokens_per_s": tokens / secs, "out": out}
        same = sum(a == c for a, c in zip(best["copied prefix"].pop("out"), best["cascade"].pop("out")))
        results["decode"][n] = {**best, "speedup": best["cascade"]["tokens_per_s"] / best["copied prefix"]["tokens_per_s"],
                                "identical_rows": same, "rows": n, "prompt_tokens": len(ours._encode_chat(convs[0])), "approx_shared_prefix_tokens": prefix}
    comps = comparisons(16)
    examples = load_fewshot(None, "feedback")[:4]
    best = {}
    scores = {}
    for _ in range(args.reps):
        for name, b in sides.items():
            labeler = Labeler(b, examples, chat=True)
            trim()
            start = current_mb()
            reset_peak()
            t0 = time.perf_counter()
            orders = labeler.label(comps)
            secs = time.perf_counter() - t0
            extra = peak_mb() - start  # resident memory the scoring added at its peak
            scores[name] = [o["logprob_A"] for os in orders for o in os] + [o["logprob_B"] for os in orders for o in os]
            if name not in best or secs < best[name]["seconds"]:
                best[name] = {"seconds": secs, "comparisons_per_s": len(comps) / secs}
            best[name]["peak_extra_mb"] = max(best[name].get("peak_extra_mb", 0.0), round(extra, 1))
    results["scoring"] = {**best, "speedup": best["copied prefix"]["seconds"] / best["cascade"]["seconds"], "comparisons": len(comps),
                          "max_abs_logprob_diff": max(abs(a - c) for a, c in zip(scores["copied prefix"], scores["cascade"]))}
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "model": args.model, "dtype": "float32"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'workload':24} {'copied prefix':>14} {'cascade':>10} {'speed-up':>9}")
    for n, r in results["decode"].items():
        print(f"{f'decode, {n} rows (tok/s)':24} {r['copied prefix']['tokens_per_s']:14.1f} {r['cascade']['tokens_per_s']:10.1f} {r['speedup']:8.2f}x"
              f"   identical rows {r['identical_rows']}/{n}, prompt {r['prompt_tokens']} tokens")
    s = results["scoring"]
    print(f"{'scoring (comparisons/s)':24} {s['copied prefix']['comparisons_per_s']:14.2f} {s['cascade']['comparisons_per_s']:10.2f} {s['speedup']:8.2f}x"
          f"   max |d logprob| {s['max_abs_logprob_diff']:.2e}")
    print(f"{'scoring peak extra (MB)':24} {s['copied prefix']['peak_extra_mb']:14.0f} {s['cascade']['peak_extra_mb']:10.0f}")


if __name__ == "__main__":
    main()
