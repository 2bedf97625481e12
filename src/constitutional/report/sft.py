"""The report's SL-CAI section: the supervised fine-tune's loss per step (`sft/loss.json`)."""

from __future__ import annotations

from . import plots
from .common import Missing, RunFiles, figs, figure, fmt, num, step_series


def sft(f: RunFiles) -> str:
    loss = f.json("sft/loss.json")
    xs, ys, _ = step_series(loss, "loss")
    if not xs:
        raise Missing("not run: cai sft")
    s = f.summary("sft")
    data = (f" on {fmt(s['revision_examples'])} revisions and {fmt(s['helpful_examples'])} helpful samples"
            if num(s.get("revision_examples")) and num(s.get("helpful_examples")) else "")
    caption = f"Training loss per step of the SL-CAI fine-tune{data} (completion tokens only)."
    return figs(figure(plots.curves([("SFT loss", xs, ys, None)]), caption))
