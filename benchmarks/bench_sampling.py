"""Top-p token choice as `Sampling._sample` makes it, against what it replaced, side by side in one
run, on real next-token logits: the filter (the top-k nucleus `nucleus` against the full-vocabulary
sort `nucleus_sorted`) and the per-row draw (`draw`, one uniform number per row, against
`torch.multinomial`, one exponential per vocabulary entry).

    python benchmarks/bench_sampling.py [--model embedded] [--prompts 16] [--steps 32] [--json PATH]

The logits are the model's own while it samples (temperature 0.7, top-p 0.9, as revise and sample
do): `--prompts` held-out chat prompts, `--steps` tokens each. Each timed step is what
`Sampling._sample` does for a batch of rows: softmax at the temperature, top-p filter, one seeded
draw per row. Three versions: full sort + multinomial (before 2606d1e), top-k nucleus +
multinomial (before the inverse-CDF draw), top-k nucleus + `draw` (now). Reports ms per step for
batches of 16 and 64 rows and the speed-ups, the share of rows whose nucleus reached past the top
k (the full-sort fallback), and whether the two filters agreed on every row (they must: same kept
tokens and values). The two draws are both exact categorical draws but use the generator
differently, so a seed gives other tokens with `draw` than it gave with `multinomial`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from constitutional.backends import load_backend
from constitutional.backends.hf_sampling import NUCLEUS_TOP_K, draw, nucleus, nucleus_sorted
from constitutional.data.loaders import load_prompts


def real_logits(backend, prompts: int, steps: int) -> torch.Tensor:
    half = prompts // 2
    convs = [p.messages for p in load_prompts("builtin:redteam", split="test", limit=half) + load_prompts("builtin:helpful", split="test", limit=prompts - half)]
    tok = backend.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok([backend.render_chat(c) for c in convs], add_special_tokens=False, padding=True, return_tensors="pt").to(backend.device)
        torch.manual_seed(0)
        with torch.no_grad():
            g = backend.model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, do_sample=True, temperature=0.7, top_p=0.9,
                                       pad_token_id=backend.pad_id, output_logits=True, return_dict_in_generate=True)
    finally:
        tok.padding_side = side
    return torch.cat([s.float().cpu() for s in g.logits])  # (steps * prompts, vocab)


def multinomial(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.multinomial(probs[k], 1, generator=g)[0] for k, g in enumerate(gens)])


def time_steps(logits: torch.Tensor, rows: int, fn, pick, top_p: float, temperature: float, repeats: int) -> float:
    batches = [logits[i : i + rows] for i in range(0, logits.shape[0] - rows + 1, rows)]
    gens = [torch.Generator().manual_seed(k) for k in range(rows)]
    t0 = time.perf_counter()
    for _ in range(repeats):
        for b in batches:
            pick(fn(torch.softmax(b / temperature, dim=-1), top_p), gens)
    return (time.perf_counter() - t0) / (repeats * len(batches)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    backend = load_backend(a.model, dtype="float32")
    logits = real_logits(backend, a.prompts, a.steps)
    probs = torch.softmax(logits / a.temperature, dim=-1)
    top_mass = probs.topk(NUCLEUS_TOP_K, dim=-1).values.sum(-1)
    agree = bool(torch.equal(nucleus(probs, a.top_p), nucleus_sorted(probs.clone(), a.top_p)))
    out = {"model": a.model, "threads": torch.get_num_threads(), "logit_rows": logits.shape[0], "vocab": logits.shape[1],
           "top_k": NUCLEUS_TOP_K, "top_p": a.top_p, "temperature": a.temperature,
           "fallback_rows": round(float((top_mass <= a.top_p).float().mean()), 4), "identical": agree, "batches": {}}
    for rows in (16, 64):
        old = time_steps(logits, rows, nucleus_sorted, multinomial, a.top_p, a.temperature, a.repeats)
        mid = time_steps(logits, rows, nucleus, multinomial, a.top_p, a.temperature, a.repeats)
        new = time_steps(logits, rows, nucleus, draw, a.top_p, a.temperature, a.repeats)
        out["batches"][rows] = {"full_sort_ms": round(old, 3), "top_k_ms": round(mid, 3), "top_k_draw_ms": round(new, 3),
                                "speedup": round(old / mid, 2), "draw_speedup": round(mid / new, 2), "total_speedup": round(old / new, 2)}
        print(f"{rows:3d} rows/step: full sort + multinomial {old:7.2f} ms, top-{NUCLEUS_TOP_K} nucleus + multinomial {mid:7.2f} ms, "
              f"+ draw {new:7.2f} ms ({mid / new:.2f}x; {old / new:.2f}x in all)")
    print(f"rows whose nucleus reached past the top {NUCLEUS_TOP_K}: {out['fallback_rows']:.1%}; filters identical on all rows: {agree}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
