"""Which judge of "which response is better" is better than chance at 135M? On the labelled
comparisons of builtin:mc (72 pairs: 24 harmless, 24 helpful, 24 honest; the correct response is
the harmless / helpful / honest one), side by side in one run on one model:

- `labeler`: the paper's multiple-choice labeler (`cai label`'s Labeler: few-shot feedback examples,
  a feedback principle, "(A)"/"(B)" log-probabilities, averaged over both orders);
- `selector`: the likelihood-ratio selector of best-of-n revisions (constitutional/selector.py),
  with its harmlessness guideline `HARMLESS`;
- `selector-principle`: the same with a constitution principle of the subset's kind (its revision
  request) as the guideline instead;
- `likelihood`: the plain log p(y | x) (the selector without the guideline).

Accuracy per subset with Wilson 95% intervals; chance is 50%.
    python benchmarks/bench_selector.py [--model embedded] [--out benchmarks/results/selector.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from constitutional import eval_math, selector
from constitutional.backends import load_backend
from constitutional.constitution import load_constitution, load_fewshot
from constitutional.data.loaders import load_mc
from constitutional.stages.label import Comparison, Labeler, combine, draw_principles, mc_comparison

GUIDELINE = {"harmless": "general-harm", "helpful": "non-evasive", "honest": "honesty-uncertainty"}  # constitution ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--out", default="benchmarks/results/selector.json")
    args = ap.parse_args()
    backend = load_backend(args.model, dtype="float32")
    constitution = load_constitution()
    items = [(it, mc_comparison(it)) for it in load_mc("builtin:mc")]
    items = [(it, c) for it, c in items if c is not None]
    hits = {j: {s: [] for s in GUIDELINE} for j in ("labeler", "selector", "selector-principle", "likelihood")}
    t0 = time.time()
    labeler = Labeler(backend, load_fewshot(None, "feedback")[:8], chat=True)
    comps = [Comparison(it.id, msgs, resp, draw_principles(constitution, 1, 0, it.id)) for it, (msgs, resp, _) in items]
    for (it, (msgs, resp, correct)), orders in zip(items, labeler.label(comps)):
        p0 = combine(orders)[0]  # P(r0 is better), both orders averaged
        hits["labeler"][it.subset].append(0.5 if p0 == 0.5 else float((p0 > 0.5) == (correct == 0)))
    t_labeler = time.time() - t0
    t0 = time.time()
    for it, (msgs, resp, correct) in items:
        principle = selector.GUIDE.format(principle=constitution.critique_by_id(GUIDELINE[it.subset]).revision)
        s = selector.pmi_scores(backend, msgs, list(resp))
        hits["selector"][it.subset].append(float(selector.pick(s) == correct))
        s = selector.pmi_scores(backend, msgs, list(resp), guideline=principle)
        hits["selector-principle"][it.subset].append(float(selector.pick(s) == correct))
        plain = backend.sequence_logprobs([backend.render_chat(msgs)] * 2, list(resp))
        hits["likelihood"][it.subset].append(float(selector.pick(plain) == correct))
    t_selector = time.time() - t0
    out = {"model": args.model, "n_per_subset": {s: len(v) for s, v in hits["labeler"].items()},
           "seconds": {"labeler": round(t_labeler, 1), "selector_and_likelihood": round(t_selector, 1)}, "accuracy": {}}
    print(f"{'judge':<12}" + "".join(f"{s:>24}" for s in GUIDELINE))
    for judge, by in hits.items():
        row = {}
        for s, xs in by.items():
            k = round(sum(xs))
            lo, hi = eval_math.wilson(k, len(xs))
            row[s] = {"accuracy": sum(xs) / len(xs), "ci": [lo, hi], "n": len(xs)}
        out["accuracy"][judge] = row
        print(f"{judge:<12}" + "".join(f"{100 * v['accuracy']:>9.0f}% [{100 * v['ci'][0]:.0f}%, {100 * v['ci'][1]:.0f}%]" for v in row.values()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    random.seed(0)
    main()
