"""Throughput of the `hf` backend against a named baseline, side by side in one run.

    python benchmarks/bench_generate.py [--model embedded] [--dtype auto] [--prompts 32] [--max-new-tokens 64]

1. Generation: 32 chat prompts (16 red-team + 16 helpful, held-out split), greedy, the same token
   budget. Baseline: HF `model.generate` called one prompt at a time (the simple loop a stage would
   otherwise write) on the same model object. Ours: `HFBackend.generate` (length-sorted batches, left
   padding, finished rows dropped). Reports generated tokens/s of each, the ratio, and how many
   outputs are token-identical (greedy; expected all in float32, bf16 batching changes rounding).
2. Shared prefix: the same prompts behind the built-in critique few-shot block (as every critique
   request has it), scored with `option_logprobs` and generated, prefix cache on vs off.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from constitutional.backends import GenerationParams, load_backend
from constitutional.constitution import load_fewshot
from constitutional.data.loaders import load_prompts


def hf_generate_one_at_a_time(backend, convs, max_new_tokens):
    outs = []
    for c in convs:
        enc = backend.tokenizer(backend.render_chat(c), add_special_tokens=False, return_tensors="pt").to(backend.device)
        with torch.no_grad():
            g = backend.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(backend.eos_ids), pad_token_id=backend.pad_id)
        ids = g[0, enc["input_ids"].shape[1] :].tolist()
        outs.append(ids[:-1] if ids and ids[-1] in backend.eos_ids else ids)
    return outs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fewshot_block() -> str:
    parts = []
    for ex in load_fewshot(None, "critique"):
        parts.append(
            f"Human: {ex['prompt']}\n\nAssistant: {ex['response']}\n\nCritiqueRequest: {ex['critique_request']}\n\n"
            f"Critique: {ex['critique']}\n\nRevisionRequest: {ex['revision_request']}\n\nRevision: {ex['revision']}"
        )
    return "\n\n-----\n\n".join(parts) + "\n\n-----\n\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(0)
    half = args.prompts // 2
    prompts = load_prompts("builtin:redteam", split="test", limit=half) + load_prompts("builtin:helpful", split="test", limit=args.prompts - half)
    convs = [p.messages for p in prompts]
    backend = load_backend(args.model, dtype=args.dtype, batch_size=args.batch_size)
    dtype = str(backend.dtype).replace("torch.", "")
    print(f"model={backend.name} dtype={dtype} threads={torch.get_num_threads()} prompts={len(convs)} max_new_tokens={args.max_new_tokens}")
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0)
    backend.generate_ids(convs[:2], GenerationParams(max_new_tokens=4, temperature=0))  # warm-up
    base, t_base = timed(lambda: hf_generate_one_at_a_time(backend, convs, args.max_new_tokens))
    ours, t_ours = timed(lambda: backend.generate_ids(convs, params))
    n_base, n_ours = sum(map(len, base)), sum(map(len, ours))
    same = sum(a == b for a, b in zip(base, ours))
    res = {
        "model": backend.name, "dtype": dtype, "prompts": len(convs), "max_new_tokens": args.max_new_tokens,
        "baseline": "transformers generate, one prompt at a time",
        "baseline_tokens": n_base, "baseline_seconds": round(t_base, 2), "baseline_tokens_per_s": round(n_base / t_base, 1),
        "ours_tokens": n_ours, "ours_seconds": round(t_ours, 2), "ours_tokens_per_s": round(n_ours / t_ours, 1),
        "speedup_tokens_per_s": round((n_ours / t_ours) / (n_base / t_base), 2), "identical_outputs": f"{same}/{len(convs)}",
    }
    print(f"[generate] baseline (HF generate, 1 prompt at a time): {n_base} tokens in {t_base:.1f}s = {n_base / t_base:.1f} tok/s")
    print(f"[generate] hf backend (batch {args.batch_size}): {n_ours} tokens in {t_ours:.1f}s = {n_ours / t_ours:.1f} tok/s")
    print(f"[generate] ratio: {res['speedup_tokens_per_s']}x tokens/s; identical greedy outputs: {same}/{len(convs)}")

    block = fewshot_block()
    fs_prompts = [block + f"Human: {p.prompt}\n\nAssistant:" for p in prompts]
    opts = [[" Sure", " I can't", " Here"]] * len(fs_prompts)
    fs_convs = [block + p.prompt for p in prompts]
    short = GenerationParams(max_new_tokens=16, temperature=0)
    for on in (True, False):
        backend.prefix_cache = on
        backend._prefix_kv.clear()
        backend.stats = {k: 0 for k in backend.stats}
        scores, t_s = timed(lambda: backend.option_logprobs(fs_prompts, opts))
        gen, t_g = timed(lambda: backend.generate_ids(fs_convs, short))
        key = "prefix_on" if on else "prefix_off"
        res[key] = {"score_seconds": round(t_s, 2), "generate_seconds": round(t_g, 2), **backend.stats}
        res[key + "_scores"], res[key + "_gen"] = scores, gen
    on, off = res["prefix_on"], res["prefix_off"]
    diff = max(abs(a - b) for x, y in zip(res.pop("prefix_on_scores"), res.pop("prefix_off_scores")) for a, b in zip(x, y))
    same_gen = sum(a == b for a, b in zip(res.pop("prefix_on_gen"), res.pop("prefix_off_gen")))
    res["prefix_tokens"] = len(backend._encode_text(block))
    res["prefix_score_speedup"] = round(off["score_seconds"] / on["score_seconds"], 2)
    res["prefix_generate_speedup"] = round(off["generate_seconds"] / on["generate_seconds"], 2)
    res["prefix_max_abs_logprob_diff"] = diff
    print(f"[prefix] few-shot block of ~{res['prefix_tokens']} tokens shared by {len(fs_prompts)} prompts")
    print(f"[prefix] option_logprobs: off {off['score_seconds']}s, on {on['score_seconds']}s -> {res['prefix_score_speedup']}x; max |diff| {diff:.2e}")
    print(f"[prefix] generate 16 tokens: off {off['generate_seconds']}s, on {on['generate_seconds']}s -> {res['prefix_generate_speedup']}x; identical {same_gen}/{len(fs_convs)}")
    print(f"[prefix] prefill tokens computed: off {off['prefill_tokens']}, on {on['prefill_tokens']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
