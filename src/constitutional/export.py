"""`cai export`: a run's records as shareable Hugging Face datasets.

    cai export --run-dir runs/x --to exports/x [--push-to-hub user/name [--private]]

Writes, for each dataset the run has records for:

    <to>/<name>/                 `datasets.save_to_disk` (reload with `datasets.load_from_disk`)
    <to>/<name>/train.parquet    the same rows as Parquet
    <to>/<name>/README.md        its dataset card: the constitution used, the models, the settings
    <to>/README.md               the card of the whole export, whose `configs` make the pushed repo
                                 load with `load_dataset(repo, "<name>")`
    <to>/export.json             what was exported from where (marks the folder as an export)

- `sft`: the supervised examples in TRL's conversational `messages` form (the prompt's messages
  then the assistant's revision or helpful answer), with `id` and `source` (revision / helpful):
  `<run>/sft/dataset.jsonl`, the examples `cai sft` trained on; before `cai sft` has run, the
  examples its recorded (else default) settings build from `<run>/revise/`;
- `preferences`: the AI-feedback comparisons of `<run>/label/preferences.jsonl` in TRL's
  conversational preference form (`prompt` messages, `chosen` / `rejected` as one assistant
  message each) with the soft label `p_chosen`, `tie`, `split`, the principles and the feedback model;
- `revisions`: `<run>/revise/revisions.jsonl` as is: every critique -> revision round with its
  principle, requests, critique, revision, status and retries, the initial and final responses,
  `usable`, the models.

The export is written to a temporary folder and renamed, so `<to>` holds a whole export or none; an
existing `<to>` is replaced only when it is an earlier export (it has export.json).
`--push-to-hub REPO` uploads the Parquet files and cards with `huggingface_hub` (a dataset repo,
created if missing; token from HF_TOKEN or `hf auth login`); a hub that cannot be reached is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .config import build
from .errors import UserError
from .run import RunDir, atomic_write_json, atomic_write_text, now, read_records

NAMES = ("sft", "preferences", "revisions")
PARQUET = "train.parquet"


def _records(path: Path) -> list[dict]:
    return [rec for rec, _ in read_records(path, "fix or delete the line, or rerun the stage that wrote it")]


def sft_rows(run_dir: RunDir) -> tuple[list[dict], str] | None:
    """(rows, where they came from), or None when the run has neither sft nor revise records."""
    path = run_dir.path / "sft" / "dataset.jsonl"
    if path.is_file():
        rows, source = _records(path), f"`{path}`: the examples `cai sft` trained on"
    elif (run_dir.path / "revise" / "revisions.jsonl").is_file():
        from .stages import sft

        recorded = run_dir.manifest.get("config", {}).get("sft") or {}
        cfg = build(sft.Config, recorded, f"{run_dir.manifest_path} (config.sft)")
        try:
            rows, _ = sft.build_dataset(cfg, run_dir)
        except UserError as e:  # e.g. no usable revision: the revisions are still worth exporting
            print(f"sft: skipped ({e})", file=sys.stderr)
            return None
        source = f"built from `{run_dir.path / 'revise'}` with the {'recorded' if recorded else 'default'} sft settings (`cai sft` has not run)"
    else:
        return None
    return [{"id": r["id"], "source": r["source"], "messages": r["prompt"] + r["completion"]} for r in rows], source


def preference_rows(run_dir: RunDir) -> tuple[list[dict], str] | None:
    path = run_dir.path / "label" / "preferences.jsonl"
    if not path.is_file():
        return None
    rows = []
    for r in _records(path):
        rows.append({
            "id": r["id"], "prompt": r["messages"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}], "rejected": [{"role": "assistant", "content": r["rejected"]}],
            "p_chosen": float(r["p_chosen"]), "tie": bool(r.get("tie")), "split": r.get("split"), "category": r.get("category"),
            "principle_ids": list(r.get("principle_ids") or []), "feedback_model": r.get("feedback_model"),
        })
    return rows, f"`{path}`"


def revision_rows(run_dir: RunDir) -> tuple[list[dict], str] | None:
    path = run_dir.path / "revise" / "revisions.jsonl"
    return (_records(path), f"`{path}`") if path.is_file() else None


# ------------------------------------------------------------------------------------ the cards
def _settings(run_dir: RunDir, stage: str) -> list[str]:
    cfg = run_dir.manifest.get("config", {}).get(stage)
    if not cfg:
        return [f"(no `{stage}` settings recorded in the manifest)"]
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {json.dumps(v, ensure_ascii=False)} |" for k, v in cfg.items()]


def _constitution(run_dir: RunDir, stage: str, kind: str) -> list[str]:
    """The principles of the constitution `stage` used (`kind`: critique_revision or feedback)."""
    from .constitution import load_constitution

    spec = (run_dir.manifest.get("config", {}).get(stage) or {}).get("constitution", "default")
    try:
        c = load_constitution(None if spec == "default" else spec)
    except UserError as e:
        return [f"`{spec}` (cannot be read now: {e})"]
    lines = [f"`{c.name}` ({'built-in' if spec == 'default' else c.source}):", ""]
    if kind == "critique_revision":
        lines += [f"- `{p.id}`: critique: {p.critique} / revision: {p.revision}" for p in c.critique_revision]
    else:
        lines += [f"- `{p.id}`: {p.text}" for p in c.feedback]
    return lines


def _models(rows: list[dict], keys: tuple[str, ...]) -> str:
    found = sorted({str(r[k]) for r in rows for k in keys if r.get(k)})
    return ", ".join(f"`{m}`" for m in found) or "(not recorded)"


def card(name: str, rows: list[dict], source: str, run_dir: RunDir) -> str:
    m = run_dir.manifest
    if name == "sft":
        what = ("Supervised SL-CAI examples (Bai et al. 2022, §3.1) in TRL's conversational `messages` form: "
                "`trl.SFTTrainer(train_dataset=load_from_disk(...))` trains on it as is.")
        columns = "`id`, `source` (revision / helpful), `messages` (the prompt's turns, then the assistant's answer)"
        revise = revision_rows(run_dir)
        models = _models(revise[0], ("model", "critique_model")) if revise else "(no revise records)"
        stages, constitution = ("revise", "sft"), _constitution(run_dir, "revise", "critique_revision")
    elif name == "preferences":
        what = ("AI-feedback comparisons (Bai et al. 2022, §4.1) in TRL's conversational preference form with the "
                "soft label `p_chosen`, the labeler's probability that `chosen` is better.")
        columns = "`id`, `prompt` (messages), `chosen`, `rejected` (one assistant message each), `p_chosen`, `tie`, `split`, `category`, `principle_ids`, `feedback_model`"
        models = _models(rows, ("feedback_model",))
        stages, constitution = ("sample", "label"), _constitution(run_dir, "label", "feedback")
    else:
        what = "Critique -> revision chains (Bai et al. 2022, §3.1), every round with its principle, requests, critique and revision."
        columns = "`id`, `prompt`, `messages`, `category`, `split`, `initial_response`, `rounds` (principle_id, critique_request, critique, revision_request, revision, status, retries), `final_response`, `usable`, `model`, `critique_model`"
        models = _models(rows, ("model", "critique_model"))
        stages, constitution = ("revise",), _constitution(run_dir, "revise", "critique_revision")
    settings = [line for s in stages for line in ["", f"### {s}", "", *_settings(run_dir, s)]]
    return "\n".join([
        "---", f"pretty_name: {m.get('name', run_dir.path.name)} {name}", "tags: [constitutional-ai, rlaif]",
        f"configs:\n- config_name: default\n  data_files: {PARQUET}", "---",
        f"# {name}: run `{m.get('name', run_dir.path.name)}`", "", what, "",
        f"- rows: {len(rows)}", f"- columns: {columns}", f"- source: {source}", f"- models: {models}",
        f"- made by constitutional, git commit `{m.get('git_commit')}`; exported {now()}", "",
        "## Constitution", "", *constitution, "", "## Settings", *settings, "",
    ])


def hub_card(counts: dict[str, int], run_dir: RunDir) -> str:
    configs = "\n".join(f"- config_name: {n}\n  data_files: {n}/{PARQUET}" for n in counts)
    listing = "\n".join(f"- `{n}`: {k} rows ([card]({n}/README.md))" for n, k in counts.items())
    return f"""---
pretty_name: Constitutional AI run {run_dir.manifest.get('name', run_dir.path.name)}
tags: [constitutional-ai, rlaif]
configs:
{configs}
---
# Constitutional AI run `{run_dir.manifest.get('name', run_dir.path.name)}`

Records of a Constitutional AI run (Bai et al. 2022) made with `constitutional`; each dataset's card
gives the constitution, the models and the settings.

{listing}

```python
from datasets import load_dataset
ds = load_dataset("<this repo>", "{next(iter(counts))}", split="train")
```
"""


# ---------------------------------------------------------------------------------------- export
def export(run_dir: RunDir, target: Path) -> dict[str, int]:
    """Write the export to `target` (see the module docstring). Returns {dataset: rows}."""
    from datasets import Dataset

    found = {name: fn(run_dir) for name, fn in (("sft", sft_rows), ("preferences", preference_rows), ("revisions", revision_rows))}
    found = {k: v for k, v in found.items() if v and v[0]}
    if not found:
        raise UserError(f"{run_dir.path}: no records to export (no sft/dataset.jsonl, label/preferences.jsonl or revise/revisions.jsonl); "
                        "run `cai revise` (and `cai label`) first, or check --run-dir")
    if target.exists() and any(target.iterdir()) and not (target / "export.json").is_file():
        raise UserError(f"--to {target}: the folder exists and is not an earlier export; choose a new folder or remove it")
    tmp = target.parent / f".{target.name}.tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        counts = {}
        for name, (rows, source) in found.items():
            ds = Dataset.from_list(rows)
            ds.save_to_disk(str(tmp / name))
            ds.to_parquet(str(tmp / name / PARQUET))
            atomic_write_text(tmp / name / "README.md", card(name, rows, source, run_dir))
            counts[name] = len(rows)
        atomic_write_text(tmp / "README.md", hub_card(counts, run_dir))
        atomic_write_json(tmp / "export.json", {"run_dir": str(run_dir.path), "exported": now(), "rows": counts,
                                                "sources": {n: s for n, (_, s) in found.items()}})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def push(target: Path, repo: str, private: bool) -> str:
    """Upload the export's Parquet files and cards to the dataset repo `repo`; returns its URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    later = f"the export is in {target}; push it later with `hf upload {repo} {target} --repo-type dataset`"
    try:
        api = HfApi()
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(target), repo_id=repo, repo_type="dataset", allow_patterns=["README.md", f"*/{PARQUET}", "*/README.md"],
                                 commit_message="cai export")
    except OfflineModeIsEnabled:
        raise UserError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it ({later})") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = "log in with `hf auth login` or set HF_TOKEN (a token with write access)" if status in (401, 403) else "check the repo id"
        raise UserError(f"--push-to-hub {repo}: the hub refused (HTTP {status}); {hint} ({later})") from None
    except Exception as e:  # no network: httpx/OS connection errors
        raise UserError(f"--push-to-hub {repo}: cannot reach the hub at {constants.ENDPOINT} ({type(e).__name__}); "
                        f"check the network ({later})") from None
    return str(getattr(info, "commit_url", None) or f"{constants.ENDPOINT}/datasets/{repo}")


def cmd_export(args) -> int:
    run_path = Path(args.run_dir)
    if not (run_path / "manifest.json").is_file():
        raise UserError(f"--run-dir {run_path}: not a run directory (no manifest.json); give the folder a `cai` stage wrote")
    counts = export(RunDir(run_path), Path(args.to))
    for name, n in counts.items():
        print(f"{name}: {n} rows -> {Path(args.to) / name} (save_to_disk) and {Path(args.to) / name / PARQUET}")
    if args.push_to_hub:
        print(f"pushed to {push(Path(args.to), args.push_to_hub, args.private)}")
    return 0
