"""Running stages: one stage (`cai <stage>`), a pipeline YAML (`cai run`), and `cai quickstart`.

A pipeline YAML has top-level settings (`run_dir`, `seed`, `model`, `memory_mb`, `fresh_process`, `stages`) and one
section per stage. `seed`, `model` and `memory_mb` are defaults for every stage whose config has
those fields, and `fresh_process` (default true) runs each stage of a pipeline in a process of
its own (`stage_process`). Each stage
runs under the run directory's lock, is skipped when it already finished with the same resolved
config (unless `--force`), and records its status, timings and summary in the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import distributed, engagement, stages
from .config import build, config_hash, load_yaml, merge, opt, parse_overrides, to_dict
from .errors import UserError
from .memory import current_mb, peak_mb, reset_peak, trim
from .run import RunDir


@dataclass
class PipelineConfig:
    run_dir: str = opt("runs/default", "run directory")
    seed: int = opt(0, "random seed, the default for every stage")
    model: str = opt("embedded", "the starting model: the default for every stage that takes a model (stages whose model is auto use this run's trained model, else this one)")
    stages: list[str] = opt([], "stages to run, in order")
    memory_mb: int = opt(0, "memory the process may use, MB: the default for every training stage's memory_mb (0 = the machine's free memory)")
    fresh_process: bool = opt(True, "run each stage in a process of its own, forked from one that has imported the libraries (no import cost), so that a stage's memory is its own, not what earlier stages left in the heap; false runs every stage in this process")


def split_pipeline(data: dict, source: str) -> tuple[PipelineConfig, dict[str, dict]]:
    """Top-level settings and per-stage sections of a pipeline mapping."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with run_dir, seed, model, stages and stage sections")
    top = {k: v for k, v in data.items() if k not in stages.BY_NAME}
    sections = {k: v for k, v in data.items() if k in stages.BY_NAME}
    for name, sec in sections.items():
        if sec is not None and not isinstance(sec, dict):
            raise UserError(f"{source}: section {name!r} must be a mapping of settings")
    pipe = build(PipelineConfig, top, source)
    for name in pipe.stages:
        if name not in stages.BY_NAME:
            raise UserError(f"{source}: stages lists unknown stage {name!r}; known stages: {', '.join(stages.BY_NAME)}")
    return pipe, {k: v or {} for k, v in sections.items()}


def stage_config(name: str, section: dict, pipe: PipelineConfig, source: str):
    module = stages.load(name)
    fields = {f.name: f.default for f in dataclasses.fields(module.Config)}
    # `model` is the run's starting model; a stage whose model defaults to `auto` (this run's
    # trained model, see stages.resolve_model) keeps that default.
    defaults = {k: getattr(pipe, k) for k in ("seed", "model", "memory_mb") if k in fields and fields[k] != "auto"}
    return module, build(module.Config, merge(defaults, section), f"{source}: {name}")


@contextlib.contextmanager
def locked(run_dir: RunDir):
    """The run directory's lock, held by the main process alone when several training processes run."""
    with contextlib.ExitStack() as stack:

        def take() -> None:
            stack.enter_context(run_dir.locked())

        distributed.on_main(take)  # a lock held elsewhere stops every rank with the same error
        yield


def is_skipped(name: str, module, cfg, run_dir: RunDir, force: bool) -> bool:
    """Whether stage `name` already finished with this config and is not to run again (no
    --force; a stage that always runs, e.g. the report, never is)."""
    return not force and not getattr(module, "ALWAYS_RUN", False) and run_dir.is_done(name, config_hash(cfg))


def skipped(name: str, run_dir: RunDir, say: bool = True) -> dict | None:
    """A skipped stage: say so, and return the summary it left."""
    if say:
        print(f"[{name}] already done with this config, skipped (use --force to rerun)", file=sys.stderr)
    return run_dir.stage_status(name).get("summary")


def run_stage(name: str, module, cfg, run_dir: RunDir, force: bool) -> dict | None:
    """Run one stage unless it already finished with this config. Returns its summary.

    Under several training processes every rank runs the stage; the main process alone decides
    (the decision reaches the others), keeps the manifest and reports."""
    main, procs = distributed.is_main(), distributed.world_size()

    def begin() -> bool:
        if is_skipped(name, module, cfg, run_dir, force):
            return False
        if getattr(module, "ALWAYS_RUN", False):  # e.g. the report: its inputs are other stages' outputs
            run_dir.manifest["stages"].pop(name, None)
        return run_dir.begin(name, to_dict(cfg), config_hash(cfg), getattr(cfg, "seed", None), force=force)

    if not distributed.on_main(begin):
        return skipped(name, run_dir, say=main)
    start_mb = current_mb()
    reset_peak()
    try:
        summary = module.run(cfg, run_dir)
    except BaseException as e:
        if main:
            run_dir.fail(name, f"{type(e).__name__}: {e}")
        raise
    finally:
        release_memory()
    if not main:
        return summary
    if procs > 1:
        summary = {**(summary or {}), "processes": procs}
    # the stage's own peak (the high-water mark was reset when it began) and what it started from
    summary = {**(summary or {}), "peak_rss_mb": peak_mb(), "start_rss_mb": start_mb}
    run_dir.finish(name, summary)
    secs = run_dir.stage_status(name).get("seconds")
    where = f" on {procs} processes" if procs > 1 else ""
    print(f"[{name}] done in {secs}s{where}: {json.dumps(summary, ensure_ascii=False)}", file=sys.stderr)
    return summary


def run_fresh(name: str, module, cfg, run_dir: RunDir, force: bool) -> dict | None:
    """`run_stage` in a process of its own (stage_process); this process keeps the lock, decides
    skips (no process for a stage that is skipped) and reloads the manifest the stage wrote. A stage
    whose process ended before it could say so (killed, interrupted early) is marked failed here."""
    from .stage_process import StageFailed, run_in_process

    if is_skipped(name, module, cfg, run_dir, force):
        return skipped(name, run_dir)
    try:
        summary = run_in_process(run_stage, name, cfg, str(run_dir.path), force)
    except BaseException as e:
        run_dir.reload()
        if run_dir.stage_status(name).get("status") == "running":  # its process ended before it could say so
            run_dir.fail(name, str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}")
        raise
    run_dir.reload()
    return summary


def release_memory() -> None:
    """After a stage: collect what its objects' reference cycles keep alive (a trainer holds its
    model, gradients and optimizer state in them, and Python's collector runs on object counts,
    not bytes), and hand the freed heap back to the OS (glibc), so that the next stage of a
    pipeline starts from what the process really holds."""
    import gc

    gc.collect()
    trim()


def cmd_stage(args) -> int:
    data = load_yaml(args.config) if args.config else {}
    source = args.config or "defaults"
    pipe, sections = split_pipeline(data, source)
    over = parse_overrides(args.set)
    # `--set key=v` addresses this stage; `--set stage.key=v` works too.
    scoped = over.pop(args.command, {})
    if not isinstance(scoped, dict):
        raise UserError(f"--set {args.command}=...: expected {args.command}.key=value")
    section = merge(merge(sections.get(args.command, {}), over), scoped)
    module, cfg = stage_config(args.command, section, pipe, f"{source} --set" if args.set else source)
    run_dir = RunDir(args.run_dir)
    if distributed.world_size() > 1 and args.command not in distributed.TRAINING_STAGES:
        raise UserError(
            f"cai {args.command}: runs in one process; start it without accelerate launch/torchrun "
            f"(only {', '.join(distributed.TRAINING_STAGES)} train with several processes; serve the model with an "
            "OpenAI-compatible server and use openai:URL#model to scale out generation)"
        )
    with locked(run_dir):
        run_stage(args.command, module, cfg, run_dir, args.force)
    return 0


def _run_pipeline(data: dict, source: str, overrides: list[str], run_dir_arg: str | None, force: bool) -> int:
    if distributed.world_size() > 1:
        raise UserError(
            "cai run/quickstart: a pipeline runs in one process; under accelerate launch/torchrun run the training "
            f"stages one by one ({', '.join(f'cai {s}' for s in distributed.TRAINING_STAGES)}), the others without a launcher"
        )
    data = merge(data or {}, parse_overrides(overrides))
    pipe, sections = split_pipeline(data, source)
    if not pipe.stages:
        raise UserError(f"{source}: stages is empty; list the stages to run, e.g. stages: [revise, sft]")
    planned = [(name, *stage_config(name, sections.get(name, {}), pipe, source)) for name in pipe.stages]
    run_dir = RunDir(run_dir_arg or pipe.run_dir)
    with run_dir.locked():
        run_dir.manifest["pipeline"] = {"source": source, "stages": pipe.stages, "seed": pipe.seed, "model": pipe.model}
        run_dir.save()
        try:
            for name, module, cfg in planned:
                if pipe.fresh_process:
                    run_fresh(name, module, cfg, run_dir, force)
                else:
                    run_stage(name, module, cfg, run_dir, force)
        finally:
            if pipe.fresh_process:
                from .stage_process import stop

                stop()
    for line in headline(run_dir, [name for name, _, _ in planned]):
        print(line)
    print(f"run directory: {run_dir.path}", file=sys.stderr)
    return 0


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else ""


def headline(run_dir: RunDir, names: list[str]) -> list[str]:
    """The end-of-run lines: the verdict on each trained model (`verdict_lines`), seconds per stage,
    peak memory, and the numbers that say whether each stage did what the paper says (from the
    stages' summaries and eval/results.json)."""
    st = run_dir.manifest["stages"]
    secs = [(n, st.get(n, {}).get("seconds")) for n in names]
    total = sum(s for _, s in secs if s)
    summ = {n: st.get(n, {}).get("summary") or {} for n in st}
    peaks = [(n, summ.get(n, {}).get("peak_rss_mb")) for n in names]
    peaks = [(n, p) for n, p in peaks if p is not None]
    top = max(peaks, key=lambda x: x[1]) if peaks else None
    results = run_dir.path / "eval" / "results.json"
    out = [""]
    if "eval" in summ and results.is_file():  # the verdict first
        out += verdict_lines(json.loads(results.read_text(encoding="utf-8")))
    out.append("== timings (s): " + ", ".join(f"{n} {s:.0f}" for n, s in secs if s is not None) + f"; total {total:.0f} s")
    if top:
        out.append("== peak memory (MB): " + ", ".join(f"{n} {p:.0f}" for n, p in peaks) + f"; highest {top[1]:.0f} ({top[0]})")
    if summ.get("label", {}).get("verdict"):
        out.append(f"== labeler: {summ['label']['verdict']}")
    pm = summ.get("train-pm", {})
    if pm.get("mc_accuracy") is not None:
        untrained = pm.get("mc_accuracy_untrained")
        held = pm.get("heldout_accuracy")
        out.append(
            f"== preference model: accuracy on the built-in comparisons {pm['mc_accuracy']:.2f}"
            + (f" (untrained head {untrained:.2f})" if untrained is not None else "")
            + (f"; held-out agreement with the labels {held:.2f} ({pm.get('heldout_comparisons')} comparisons)" if held is not None else "; no held-out comparisons")
        )
    ev = (summ.get("rl", {}) or {}).get("eval") or {}
    if ev.get("win_rate_rl_cai") is not None:
        out.append(f"== RL-CAI vs SL-CAI on {ev['prompts']} held-out prompts: win rate {ev['win_rate_rl_cai']:.2f} {_fmt_ci(ev.get('win_rate_ci95'))}, PM score change {ev['pm_score_difference']:+.3f} {_fmt_ci(ev.get('pm_score_difference_ci95'))}")
    dp = summ.get("dpo", {})
    if dp.get("steps") is not None:
        held, ev = dp.get("heldout_accuracy_after"), dp.get("eval") or {}
        out.append(
            f"== DPO ({dp.get('data')}, {dp.get('loss')} loss, {dp['steps']} steps): "
            + (f"held-out log π(chosen) > log π(rejected) {dp['heldout_accuracy_before']:.2f} -> {held:.2f} ({dp['heldout_comparisons']} comparisons)"
               if held is not None else "no held-out comparisons")
            + (f"; vs SL-CAI on {ev['prompts']} held-out prompts: win rate {ev['win_rate_dpo']:.2f} {_fmt_ci(ev.get('win_rate_ci95'))}" if ev else "")
            + (f", PM score change {ev['pm_score_difference']:+.3f} {_fmt_ci(ev.get('pm_score_difference_ci95'))}" if ev.get("pm_score_difference") is not None else "")
        )
    d = summ.get("distill", {})
    if d.get("gap_closed") is not None:
        mc = d.get("mc_accuracy") or {}
        out.append(f"== context distillation: KL {d['kl_before']:.3f} -> {d['kl_after']:.3f} nats/token ({d['gap_closed']:.0%} of the gap closed), {d['prompt_tokens_saved_per_request']:.0f} prompt tokens saved per request"
                   + (f"; MC accuracy plain {mc.get('plain')}, prompted {mc.get('prompted')}, distilled {mc.get('distilled')}" if mc else ""))
    rep = summ.get("report", {}).get("report")
    if rep:
        out.append(f"== report: {rep}")
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _p(p: float) -> str:
    """A McNemar p-value as the verdict lines print it: 'p < 0.001' or 'p = 0.016'."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _change(c: dict, what: str) -> str:
    """'2% -> 31% of 193 harmful prompts (+29 points [20, 38], p < 0.001: significant)'."""
    if not c or c.get("difference") is None:
        return f"no {what}"
    lo, hi = c["ci"]
    return (f"{_pct(c['before'])} -> {_pct(c['after'])} of {c['n']} {what} ({100 * c['difference']:+.0f} points "
            f"[{100 * lo:+.0f}, {100 * hi:+.0f}], {_p(c['p_value'])}: "
            f"{'significant' if c['significant'] else 'not significant'})")


def _engaged(ch: dict) -> str:
    """'; takes up the request in 95% -> 40% of harmful prompts (p < 0.001) and 97% -> 52% of benign
    ones (p < 0.001; engagement check 84% [76%, 90%] accurate on hand labels)'."""
    h, b = ch.get("harmful_engaged"), ch.get("benign_engaged")
    if not h or not b or h.get("difference") is None or b.get("difference") is None:
        return ""
    acc, lo, hi = engagement.TEST_ACCURACY
    return (f"; takes up the request in {_pct(h['before'])} -> {_pct(h['after'])} of harmful prompts ({_p(h['p_value'])}) and "
            f"{_pct(b['before'])} -> {_pct(b['after'])} of benign ones ({_p(b['p_value'])}; engagement check {_pct(acc)} [{_pct(lo)}, {_pct(hi)}] "
            "accurate on hand labels)")


def _opening(c: dict | None, base: str) -> str:
    """'; opens 55% of its 353 answers with "i'm here to..." (base 1%, p < 0.001)': the stock opening the refusal
    classifier does not read."""
    if not c or c.get("after") is None or round(c["after"] * c["n"]) < 2:  # one answer is no stock opening
        return ""
    return f"; opens {_pct(c['after'])} of its {c['n']} answers with \"{c['opening']}...\" ({base} {_pct(c['before'])}, {_p(c['p_value'])})"


def verdict_lines(res: dict) -> list[str]:
    """The verdict of eval/results.json, one line per trained model: how often it refuses held-out
    harmful prompts and benign look-alikes against the starting model (paired on the same prompts:
    the difference, its 95% interval and the exact McNemar test), how often its answers take up the
    request at all (`engagement.py`), how often its most common opening starts an answer, then its
    Elo, with what the judge's own accuracy says an Elo from it is worth."""
    out = []
    refusal = res.get("refusal") or {}
    names = list(res.get("models") or refusal)
    base = names[0] if names else None
    judge = res.get("judge") or {}
    if judge.get("accuracy") is not None:
        lo, hi = judge["ci"]
        note = (f"at chance ({_pct(judge['accuracy'])} [{_pct(lo)}, {_pct(hi)}] on {judge['n']} labelled comparisons, "
                f"both orders): an Elo from it is no evidence either way" if judge.get("at_chance") else
                f"{_pct(judge['accuracy'])} [{_pct(lo)}, {_pct(hi)}] accurate on {judge['n']} labelled comparisons")
    else:
        note = "not checked on labelled comparisons: read an Elo from it with care"
    for name in names[1:]:
        r = refusal.get(name) or {}
        ch = r.get("change") or {}
        line = f"== {name} vs {base}: refuses " + _change(ch.get("harmful"), "harmful prompts") + "; over-refuses " + _change(ch.get("benign"), "benign look-alikes")
        line += _engaged(ch) + _opening(ch.get("opening"), base)
        harm = (res.get("harmlessness") or {}).get("elo", {}).get(name, {})
        helpf = (res.get("helpfulness") or {}).get("elo", {}).get(name, {})
        if harm or helpf:
            elo = ", ".join(f"{k} Elo {v['elo']:+.0f}" for k, v in (("harmlessness", harm), ("helpfulness", helpf)) if v)
            line += f"; {elo} (judge {note})"
        out.append(line)
    if base in refusal and not names[1:]:
        r = refusal[base]
        out.append(f"== {base}: refuses {_pct(r['harmful_refusal_rate'])} of {r['n_harmful']} harmful prompts, "
                   f"{_pct(r['benign_refusal_rate'])} of {r['n_benign']} benign look-alikes (no trained model to compare)")
    return out


def cmd_run(args) -> int:
    return _run_pipeline(load_yaml(args.config), args.config, args.set, args.run_dir, args.force)


def quickstart_config_path() -> Path:
    return Path(str(resources.files("constitutional") / "data" / "quickstart.yaml"))


def cmd_quickstart(args) -> int:
    path = quickstart_config_path()
    return _run_pipeline(load_yaml(path), "quickstart", args.set, args.run_dir, args.force)
