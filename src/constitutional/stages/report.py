"""`cai report`: one self-contained HTML page that shows what a run directory holds.

Reads what the other stages wrote (manifest, `eval/results.json`, training curves and metrics, the
labeler's diagnostics, RL metrics, distillation measurements, revision chains) and writes
`<run>/report/report.html` atomically: inline CSS, figures embedded as PNG data URIs, nothing fetched
from the network, so the file can be mailed or archived as is. Each section appears when its inputs
exist; otherwise a one-line note names the command that produces them (`report/html.py` lists the
sections and the paper figures they mirror; `report/plots.py` what each figure draws).

The report reflects the run directory as it is now, so it is regenerated on every call rather than
skipped as "already done with this config" (`ALWAYS_RUN`).

Run: `cai report --run-dir runs/x` (`--set chains=5 --set output=/tmp/x.html`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..run import RunDir, atomic_write_text

STAGE = "report"
ALWAYS_RUN = True  # the inputs are other stages' outputs, which the config hash does not cover


@dataclass
class Config:
    title: str = opt("", "page title ('' = 'Constitutional AI run report: <run directory name>')")
    chains: int = opt(3, "how many critique -> revision chains from revise/revisions.jsonl to show (0 = none)")
    output: str = opt("", "where to write the page ('' = <run>/report/report.html)")


def run(cfg: Config, run_dir: RunDir) -> dict:
    from ..report.html import build_report  # matplotlib is imported only when a report is made

    title = cfg.title or f"Constitutional AI run report: {run_dir.path.name}"
    page, sections = build_report(run_dir.path, run_dir.manifest, title, cfg.chains)
    path = Path(cfg.output) if cfg.output else run_dir.stage_dir(STAGE) / "report.html"
    atomic_write_text(path, page)
    return {
        "report": str(path),
        "sections": [s.key for s in sections if not s.missing],
        "missing": [s.key for s in sections if s.missing],
        "images": page.count("<img "),
        "bytes": len(page.encode("utf-8")),
    }
