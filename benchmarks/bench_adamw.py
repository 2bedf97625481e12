"""One AdamW step over a SmolLM2-135M-shaped model (134.5M float32 parameters), in the two ways
torch offers: the fused kernel (`fused=True`: what distill's loop uses, and transformers' default
optimizer `adamw_torch_fused` for the TRL stages) against torch's default (on CPU tensors the
per-tensor loop: what distill used before) and the multi-tensor `foreach` path, side by side in one
process, alternating.

    python benchmarks/bench_adamw.py [--rounds 2] [--steps 4] [--json PATH]

Reports the seconds per step (the minimum and the mean of `--steps` after the step that creates
the state) and the resident memory a step needs above the steady state (weights, gradients and
both moments): the per-tensor loop builds temporaries as large as the largest tensor (the tied
embedding), the foreach path as large as the whole model, the fused kernel none. All three give the
same update up to rounding.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def _hwm_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    runs: dict[str, list] = {"default": [], "foreach": [], "fused": []}
    kwargs = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for _ in range(args.rounds):
        for name in runs:
            opt = torch.optim.AdamW(params, lr=1e-5, **kwargs[name])
            opt.step()  # creates the moments
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")
            steady = _hwm_mb()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
            runs[name].append({"min_s": round(min(times), 4), "mean_s": round(sum(times) / len(times), 4),
                               "step_peak_above_steady_mb": _hwm_mb() - steady})
            del opt
            gc.collect()
    best = {n: min(r["min_s"] for r in rs) for n, rs in runs.items()}
    out = {"parameters": sum(p.numel() for p in params), "threads": torch.get_num_threads(), "runs": runs,
           "speedup_fused_over_default": round(best["default"] / best["fused"], 2),
           "speedup_fused_over_foreach": round(best["foreach"] / best["fused"], 2)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
