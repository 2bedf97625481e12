"""Assemble the HTML report of a run directory: one self-contained file (inline CSS, figures as PNG
data URIs, no network), readable at 1280 px.

`build_report(run_path, manifest, title, chains)` reads what the stages wrote (docs/ARCHITECTURE.md
"Run directory") and returns the page and what it holds; each section is a module of its own
(`overview.py`, `elo.py`, ...: a function `RunFiles -> HTML`), `common.py` holds what they share.
Each section is shown only when its inputs exist; otherwise a one-line note says which command
produces them ("not run: cai eval"). A file that exists
but cannot be read (malformed JSON, a corrupt record line) gives an "unreadable" note for its section
instead of stopping the report, since a report is most needed when something went wrong. Every piece
of text from a record is HTML-escaped. The sections (`SECTIONS`, in page order) and the paper figures
they mirror (Bai et al. 2022, arXiv 2212.08073; plots.py says what each figure draws):

1. overview: the manifest (stages, status, seconds, config hashes, versions, git commit), headline numbers.
2. elo: harmlessness vs helpfulness Elo per model (Figure 2).
3. revision-quality: what the final revisions do (address the human, decline, redirect, copy
   few-shot or critique text), by principle; revision-rounds: PM score over critique → revision
   rounds (Figure 5).
4. behaviour: refusal and over-refusal rates, multiple-choice accuracy, truthfulness plain vs
   prompted, prompt-injection follow and flip rates (from `eval/results.json`).
5. sft: the SL-CAI fine-tuning loss.
6. preference-model: PM training loss, calibration (Figure 10's reliability diagram), accuracy
   trained vs untrained.
7. labeler: the verdict, position bias, p_chosen histogram, MC calibration of the feedback model.
8. rl: RL-CAI reward, PM score, KL, length and entropy per step (Figure 4's axes); the RL-CAI vs
   SL-CAI evaluation.
9. dpo: DPO loss, margin, accuracy, rewards and KL per step; held-out preference accuracy before and
   after; the DPO vs SL-CAI evaluation (not in the paper: the alternative to RL).
10. distill: context distillation's held-out KL before/after and MC plain / prompted / distilled.
11. chains: a few critique → revision chains (the SL-CAI data, §3).

The page ends with a small inline script that sets `data-images-ok` on <body> to "yes" once every
image has decoded (the browser test reads it), and shows a banner when one has not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..run import now
from .behaviour import behaviour
from .chains import chains
from .common import Missing, RunFiles, Section, as_dict, esc, note
from .distill import distill
from .dpo import dpo
from .elo import elo
from .labeler import labeler
from .overview import overview
from .preference_model import preference_model
from .revision_quality import revision_quality
from .revision_rounds import revision_rounds
from .rl import rl
from .sft import sft

CSS = """
body{margin:0;background:#f4f5f7;color:#1f2328;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif}
main,header{max-width:1220px;margin:0 auto;padding:0 20px}
header{padding-top:24px}h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:0 0 12px}h3{font-size:15px;margin:18px 0 8px}
.sub{color:#57606a;margin:0 0 12px}nav{display:flex;flex-wrap:wrap;gap:6px 14px;margin-bottom:16px}
nav a{color:#0b57a4;text-decoration:none}nav a.missing{color:#8c959f}
section{background:#fff;border:1px solid #d8dee4;border-radius:6px;padding:16px 20px;margin:0 0 16px}
section.missing{padding:10px 20px}section.missing h2{display:inline;font-size:15px;margin-right:10px}section.missing .note{display:inline}
.figs{display:flex;flex-wrap:wrap;gap:16px;margin:4px 0 8px}figure{margin:0;max-width:100%}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eaeef2}
figcaption{font-size:12px;color:#57606a;margin-top:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border-bottom:1px solid #eaeef2;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}table.kv thead{display:none}table.kv td:first-child{color:#57606a}
.note{color:#57606a;font-style:italic;margin:6px 0}.warn{color:#9a3412;margin:6px 0}
.verdict{background:#fff4d6;border:1px solid #e3b341;border-radius:6px;padding:10px 14px;font-size:15px}
ul.notes{color:#7d4e00}details{margin:8px 0}pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:420px}
.chain{border-left:3px solid #3b6ea5;padding:2px 0 2px 14px;margin:14px 0}.chain h3{margin-top:0}
.block{margin:6px 0}.label{font-size:11px;text-transform:uppercase;letter-spacing:.04em;color:#57606a}
.text{white-space:pre-wrap;background:#f6f8fa;border-radius:4px;padding:6px 10px}.text.final{background:#eaf5ec}
.request{white-space:pre-wrap;color:#57606a;font-size:12px}
.round{border-top:1px dashed #d8dee4;margin-top:8px;padding-top:6px}.round-head{font-weight:600}
.status.ok{color:#1a7f37}.status.bad{color:#b35900}code{font-size:12px}
#image-error{display:none;background:#ffebe9;border:1px solid #cf222e;padding:8px 12px;margin:8px 0}
"""

# Sets <body data-images-ok="yes|no"> once the page has loaded, for the browser test and for readers.
IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.imagesLoaded = String(ok);
  document.body.dataset.imagesOk = ok === images.length ? "yes" : "no";
  if (ok !== images.length) { document.getElementById("image-error").style.display = "block"; }
});
"""


SECTIONS: list[tuple[str, str, Callable[..., str]]] = [
    ("overview", "Run overview", overview),
    ("elo", "Harmlessness vs helpfulness (Elo)", elo),
    ("revision-quality", "Revision quality (the SL-CAI data)", revision_quality),
    ("revision-rounds", "PM score over revision rounds", revision_rounds),
    ("behaviour", "Refusals, multiple choice, truthfulness, prompt injection", behaviour),
    ("sft", "Supervised stage (SL-CAI) training", sft),
    ("preference-model", "Preference model", preference_model),
    ("labeler", "AI-feedback labeler", labeler),
    ("rl", "RL-CAI training", rl),
    ("dpo", "DPO (preference optimisation without RL)", dpo),
    ("distill", "Context distillation", distill),
    ("chains", "Sample critique → revision chains", chains),
]


def build_report(run_path: Path, manifest: dict, title: str, chain_count: int) -> tuple[str, list[Section]]:
    """The report page of the run directory at `run_path` and its sections (shown or missing)."""
    files = RunFiles(run_path, manifest)
    sections = []
    for key, heading, make in SECTIONS:
        try:
            sections.append(Section(key, heading, body=make(files, chain_count) if make is chains else make(files)))
        except Missing as e:
            sections.append(Section(key, heading, missing=str(e)))
    nav = "".join(f'<a href="#{s.key}" class="{"missing" if s.missing else ""}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.key}" class="missing" data-section="{s.key}"><h2>{esc(s.title)}</h2>{note(s.missing)}</section>' if s.missing
        else f'<section id="{s.key}" class="shown" data-section="{s.key}"><h2>{esc(s.title)}</h2>{s.body}</section>'
        for s in sections)
    version = as_dict(manifest.get("versions")).get("constitutional")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<header><h1>{esc(title)}</h1>"
            f'<p class="sub">{esc(run_path)} · generated {esc(now())} by cai report'
            f'{" (constitutional " + esc(version) + ")" if version else ""}</p><nav>{nav}</nav>'
            '<div id="image-error">Some figures failed to load.</div></header>\n'
            f"<main>{body}</main>\n<script>{IMAGE_CHECK}</script>\n</body></html>\n")
    return page, sections
