"""Throughput of the label stage's labeler against a naive labeler, side by side in one run.

    python benchmarks/bench_label.py [--model embedded] [--dtype float32] [--pairs 16] [--fewshot 8] [--batch-size 8] [--name NAME]

Comparisons: the first N items of the built-in multiple-choice set as response pairs (question,
correct and incorrect response), one principle drawn per comparison, both orders, the built-in
few-shot examples in chat mode: what `cai label` scores.
Ours: `stages.label.Labeler` (one `option_logprobs` call per batch of comparisons: the shared
few-shot prefix encoded once, both options scored in one forward pass per prompt, batched).
Baseline: the same prompt texts one at a time, each option scored by its own full forward pass
without any cache (`HFBackend.brute_force_option_logprobs`), the loop a stage would otherwise write.
Reports comparisons/s of each (a comparison = both orders), the ratio, the largest log-prob
difference and how many labels agree; writes `benchmarks/results/label_<name>.json`
(name: the dtype unless given).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from constitutional.backends import load_backend
from constitutional.constitution import load_constitution, load_fewshot
from constitutional.data.loaders import load_mc
from constitutional.feedback import OPTIONS, normalise_pair
from constitutional.stages.label import Comparison, Labeler, combine, draw_principles, mc_comparison

RESULTS = Path(__file__).resolve().parent / "results"


def comparisons(n: int, seed: int = 0) -> list[Comparison]:
    constitution = load_constitution()
    out = []
    for item in load_mc("builtin:mc"):
        c = mc_comparison(item)
        if c is not None:
            out.append(Comparison(item.id, c[0], c[1], draw_principles(constitution, 1, seed, item.id)))
    return out[:n]


def naive_label(labeler: Labeler, comps: list[Comparison]) -> list[list[dict]]:
    """The same prompts, one at a time, one plain forward pass per option."""
    out = []
    for c in comps:
        orders = []
        for p, order, q in labeler.questions(c):
            la, lb = labeler.backend.brute_force_option_logprobs(labeler.prompt(q), list(OPTIONS))
            orders.append({"principle_id": p.id, "order": order, "logprob_A": la, "logprob_B": lb, "p_A": normalise_pair(la, lb)})
        out.append(orders)
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--pairs", type=int, default=16, help="comparisons to label (each in both orders)")
    ap.add_argument("--fewshot", type=int, default=8, help="few-shot examples before each question")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--name", help="results file name: benchmarks/results/label_<name>.json (default: the dtype)")
    args = ap.parse_args()
    torch.manual_seed(0)
    backend = load_backend(args.model, dtype=args.dtype, batch_size=args.batch_size)
    dtype = str(backend.dtype).replace("torch.", "")
    labeler = Labeler(backend, load_fewshot(None, "feedback")[: args.fewshot])
    comps = comparisons(args.pairs)
    tokens = len(backend._encode_text(labeler.prompt(labeler.questions(comps[0])[0][2])))
    print(f"model={backend.name} dtype={dtype} threads={torch.get_num_threads()} comparisons={len(comps)} "
          f"prompts={2 * len(comps)} fewshot={args.fewshot} (~{tokens} tokens per prompt)")
    labeler.label(comps[:1])  # warm-up
    backend.stats = {k: 0 for k in backend.stats}
    base, t_base = timed(lambda: naive_label(labeler, comps))
    ours, t_ours = timed(lambda: [o for chunk in range(0, len(comps), args.batch_size) for o in labeler.label(comps[chunk : chunk + args.batch_size])])
    diff = max(abs(a[k] - b[k]) for x, y in zip(base, ours) for a, b in zip(x, y) for k in ("logprob_A", "logprob_B"))
    same = sum((combine(x)[0] >= 0.5) == (combine(y)[0] >= 0.5) for x, y in zip(base, ours))
    n = len(comps)
    res = {
        "model": backend.name, "dtype": dtype, "comparisons": n, "prompts": 2 * n, "fewshot": args.fewshot,
        "tokens_per_prompt_approx": tokens, "batch_size": args.batch_size,
        "baseline": "one prompt at a time, one plain forward pass per option (brute_force_option_logprobs)",
        "baseline_seconds": round(t_base, 2), "baseline_comparisons_per_s": round(n / t_base, 3),
        "ours_seconds": round(t_ours, 2), "ours_comparisons_per_s": round(n / t_ours, 3),
        "speedup_comparisons_per_s": round(t_base / t_ours, 2),
        "max_abs_logprob_diff": diff, "same_labels": f"{same}/{n}",
        "ours_prefill_tokens": backend.stats["prefill_tokens"], "ours_prefix_tokens_reused": backend.stats["prefix_tokens_reused"],
    }
    print(f"[label] baseline (1 prompt at a time, 1 forward per option): {n} comparisons in {t_base:.1f}s = {n / t_base:.3f}/s")
    print(f"[label] labeler (batched, shared prefix, options in one pass): {n} comparisons in {t_ours:.1f}s = {n / t_ours:.3f}/s")
    print(f"[label] ratio: {res['speedup_comparisons_per_s']}x comparisons/s; max |logprob diff| {diff:.2e}; same labels {same}/{n}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"label_{args.name or {'float32': 'fp32', 'bfloat16': 'bf16'}.get(args.dtype, args.dtype)}.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
