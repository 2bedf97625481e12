"""`cai report`: the page from fabricated run directories (every input present; only some stages).

Checks that every <img> is an embedded PNG that decodes, that nothing refers to an outside resource,
that sections appear exactly when their inputs exist, and that record text is HTML-escaped.
`make_run_dir` is also used by tests/integration/test_report_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from constitutional.config import field_help
from constitutional.run import RunDir
from constitutional.stages import report

ALL_SECTIONS = ["overview", "elo", "revision-quality", "revision-rounds", "behaviour", "sft", "preference-model", "labeler", "rl", "dpo", "distill", "chains"]
HOSTILE = '<script>alert("x")</script> & <img src="http://evil.example/x.png">'
MODELS = {"base": "embedded", "sl-cai": "runs/x/sft/model", "rl-cai": "runs/x/rl/model"}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, list) and path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj), encoding="utf-8")
    else:
        path.write_text(json.dumps(obj), encoding="utf-8")


def _bins(conf_key: str, acc_key: str) -> list[dict]:
    return [{"lo": lo / 10, "hi": lo / 10 + 0.1, "count": 12 - lo, conf_key: lo / 10 + 0.05, acc_key: min(1.0, lo / 10 + 0.02)}
            for lo in range(5, 10)]


def _results() -> dict:
    elo = lambda base: {n: {"elo": base + 40.0 * i, "ci": [base + 40.0 * i - 25, base + 40.0 * i + 30]} for i, n in enumerate(MODELS)}
    pm = {n: {"mean": 0.1 * i, "ci": [0.1 * i - 0.05, 0.1 * i + 0.05], "n": 16} for i, n in enumerate(MODELS)}
    return {
        "models": MODELS, "datasets": {"redteam": "builtin:redteam"}, "settings": {"seed": 0},
        "harmlessness": {"elo": elo(0.0), "pm_score": pm, "n_prompts": 16, "comparisons": 96},
        "helpfulness": {"elo": elo(-20.0), "pm_score": None, "n_prompts": 16, "comparisons": 96},
        "refusal": {n: {"harmful_refusal_rate": 0.2 + 0.3 * i, "harmful_ci": [0.1 + 0.3 * i, 0.3 + 0.3 * i], "n_harmful": 16,
                        "benign_refusal_rate": 0.05 * i, "benign_ci": [0.0, 0.1 + 0.05 * i], "n_benign": 16} for i, n in enumerate(MODELS)},
        "mc": {n: {"builtin:mc": {"accuracy": 0.5 + 0.1 * i, "by_subset": {"harmless": 0.6}, "n": 72, "both_orders": True},
                   "/data/hhh/task.json": {"accuracy": 0.55, "by_subset": {}, "n": 30, "both_orders": False}} for i, n in enumerate(MODELS)},
        "truthfulness": {n: {"plain": 0.3 + 0.1 * i, "prompted": 0.35 + 0.1 * i, "n": 40, "file": "builtin:truthful"} for i, n in enumerate(MODELS)},
        "injection": {"user_content": {n: {"followed_rate": 0.5 - 0.2 * i, "n": 10} for i, n in enumerate(MODELS)},
                      "labeler": {"plain": {"flip_rate": 0.4, "n": 20}, "hardened": {"flip_rate": 0.1, "n": 20}}},
        "revision_rounds": {"rounds": [0, 1, 2, 3], "mean_pm": [-0.5, 0.1, 0.3, 0.35], "ci": [[-0.7, -0.3], [0.0, 0.2], [0.2, 0.4], [0.25, 0.45]], "n": 16},
        "samples": {"base": [{"prompt": "p", "response": "r"}]},
        "notes": [f"note with markup {HOSTILE}"],
    }


def _revision(i: int, usable: bool) -> dict:
    rounds = [{"principle_id": f"principle-{k}", "critique_request": "Identify harm.", "critique": f"critique {k} {HOSTILE}",
               "revision_request": "Rewrite it.", "revision": f"revision {k} of chain {i}", "status": "ok" if k else "dropped:echo_critique"}
              for k in range(2)]
    return {"id": f"rt-{i:04d}", "prompt": f"prompt {i} {HOSTILE}", "category": "violence", "initial_response": f"initial {i}\nsecond line",
            "rounds": rounds, "final_response": f"final {i}", "usable": usable}


def make_run_dir(path: Path, stages: tuple[str, ...] = ("revise", "sft", "label", "train-pm", "rl", "dpo", "distill", "eval")) -> Path:
    """A run directory with the files each of `stages` writes (shapes as the real stages write them)."""
    manifest = {"name": path.name, "created": "2026-01-01T00:00:00+00:00", "seed": 0, "git_commit": "abc123",
                "pipeline": {"source": "configs/x.yaml", "model": "embedded"},
                "versions": {"python": "3.11", "constitutional": "0.1.0", "torch": "2.13"},
                "config": {s: {"seed": 0} for s in stages},
                "stages": {s: {"status": "done", "config_hash": f"hash-{s}", "seconds": 1.5, "finished": "2026-01-01T00:01:00+00:00",
                               "summary": {"usable": 3, "prompts": 4, "first_loss": 2.0, "final_loss": 1.0, "steps": 20,
                                           "position_bias_rate": 0.3, "mc": {"accuracy": 0.7}, "score_first": 0.1, "score_last": 0.4,
                                           "kl_last": 0.02, "warnings": [f"reward rose {HOSTILE}"], "kl_before": 0.5, "kl_after": 0.2,
                                           "gap_closed": 0.6}}
                           for s in stages}}
    _write(path / "manifest.json", manifest)
    if "revise" in stages:
        _write(path / "revise" / "revisions.jsonl", [_revision(i, usable=i % 2 == 1) for i in range(6)])
    if "sft" in stages:
        _write(path / "sft" / "loss.json", [{"step": s, "loss": 2.0 / s ** 0.3, "learning_rate": 1e-5, "epoch": s / 20} for s in range(1, 21)])
    if "label" in stages:
        _write(path / "label" / "diagnostics.json", {
            "feedback_model": "embedded", "comparisons": 64, "position_bias_rate": 0.3, "order_consistency": 0.7, "share_A": 0.55,
            "p_chosen_histogram": {"0.5-0.6": 30, "0.6-0.7": 20, "0.7-0.8": 10, "0.8-0.9": 4, "0.9-1.0": 0},
            "mc": {"set": "builtin:mc", "items": 72, "accuracy": 0.7, "ece": 0.05, "accuracy_by_subset": {"harmless": 0.6},
                   "calibration_bins": [{"bin": "0.5-0.6", "count": 40, "mean_p": 0.55, "accuracy": 0.6},
                                        {"bin": "0.6-0.7", "count": 0, "mean_p": None, "accuracy": None},
                                        {"bin": "0.7-0.8", "count": 32, "mean_p": 0.75, "accuracy": 0.8}]},
            "verdict": f"labeler fine {HOSTILE}"})
    if "train-pm" in stages:
        _write(path / "train-pm" / "loss.json", [{"loss": 0.69 - 0.01 * s, "step": s} for s in range(1, 11)] + [{"train_loss": 0.6, "step": 10}])
        held = {"count": 13, "accuracy": 0.8, "loss": 0.6, "ece": 0.04, "bins": _bins("confidence", "agreement")}
        mc = {"count": 72, "accuracy": 0.65, "accuracy_by_subset": {"harmless": 0.7, "honest": 0.5}}
        _write(path / "train-pm" / "metrics.json", {"heldout": held, "mc": mc, "untrained": {"heldout": {**held, "accuracy": 0.5}, "mc": {**mc, "accuracy": 0.45}}})
    if "rl" in stages:
        _write(path / "rl" / "metrics.jsonl", [{"id": f"step-{s}", "step": s, "rl/reward": 0.0, "rl/reward_std": 1.0, "rl/score": 0.1 * s,
                                                 "rl/score_std": 0.5, "rl/kl": 0.001 * s, "rl/length": 30 + s} for s in range(1, 13)])
        comp = {"prompts": 8, "pm_score_rl_cai": 0.4, "pm_score_sl_cai": 0.1, "pm_score_difference_ci95": [0.1, 0.5],
                "win_rate_rl_cai": 0.7, "win_rate_ci95": [0.45, 0.86]}
        _write(path / "rl" / "eval.json", {"all": comp, "by_set": {"redteam": comp, "helpful": {**comp, "win_rate_rl_cai": 0.55}},
                                           "feedback_model": "embedded", "sampling": {"temperature": 1.0}})
    if "dpo" in stages:
        _write(path / "dpo" / "metrics.jsonl", [{"id": f"step-{s}", "step": s, "dpo/loss": 0.69 - 0.02 * s, "dpo/margin": 0.1 * s,
                                                  "dpo/accuracy": min(1.0, 0.1 * s), "dpo/chosen_reward": 0.05 * s,
                                                  "dpo/rejected_reward": -0.05 * s, "dpo/kl": 0.001 * s} for s in range(1, 9)])
        block = {"count": 6, "before": {"count": 6, "accuracy": 0.5, "margin": -1.0}, "after": {"count": 6, "accuracy": 0.83, "margin": 2.0},
                 "reward": {"count": 6, "accuracy": 1.0, "margin": 0.3}}
        _write(path / "dpo" / "heldout.json", {"count": 6, "all": block, "by_source": {"revisions": block}})
        comp = {"prompts": 8, "pm_score_dpo": None, "pm_score_sl_cai": None, "win_rate_dpo": 0.6, "win_rate_ci95": [0.3, 0.85]}
        _write(path / "dpo" / "eval.json", {"all": comp, "by_set": {"redteam": comp}, "feedback_model": "embedded", "reward_model": None})
    if "distill" in stages:
        _write(path / "distill" / "eval.json", {"kl_before": 0.5, "kl_after": 0.2, "gap_closed": 0.6, "prompt_tokens_saved_per_request": 1400.0,
                                                "mc": "builtin:mc", "mc_accuracy": {"plain": 0.5, "prompted": 0.62, "distilled": 0.6},
                                                "heldout_before": {"kl_per_token": 0.5}})
    if "eval" in stages:
        _write(path / "eval" / "results.json", _results())
    return path


class Page(HTMLParser):
    """Collects tags, attributes, <img> sources and the text of <style> and <script>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.images, self.sections, self.inline = [], [], {}, []
        self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "img":
            self.images.append(a)
        if tag == "section":
            self.sections[a["data-section"]] = a["class"]
        self._in = tag if tag in ("style", "script") else None

    def handle_data(self, data):
        if self._in:
            self.inline.append((self._in, data))


def _report(run: Path, **cfg) -> tuple[dict, str, Page]:
    summary = report.run(report.Config(**cfg), RunDir(run))
    text = Path(summary["report"]).read_text(encoding="utf-8")
    return summary, text, Page(text)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return _report(make_run_dir(tmp_path_factory.mktemp("full")), title="My <run> report")


def test_every_image_is_an_embedded_png_that_decodes(full):
    from PIL import Image

    summary, _, page = full
    assert len(page.images) == summary["images"] >= 14
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        data = base64.b64decode(img["src"].split(",", 1)[1], validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (2 * int(img["width"]), 2 * int(img["height"]))  # drawn at 2x the display size
        assert img.get("alt")


def test_nothing_refers_to_an_outside_resource(full):
    _, _, page = full
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base")
        for name in ("src", "href", "srcset", "poster", "data", "action", "background"):
            if name in attrs:
                assert attrs[name].startswith(("data:", "#")), (tag, name, attrs[name][:80])
        assert not (tag == "script" and "src" in attrs)
    for kind, text in page.inline:
        assert "url(" not in text and "@import" not in text and "http" not in text, kind


def test_every_section_is_shown_when_every_input_exists(full):
    summary, text, page = full
    assert summary["sections"] == ALL_SECTIONS and summary["missing"] == []
    assert page.sections == {k: "shown" for k in ALL_SECTIONS}
    assert "<title>My &lt;run&gt; report</title>" in text
    assert "labeler fine" in text and 'class="verdict"' in text
    assert text.count('<article class="chain">') == 3  # the default `chains`


def test_dpo_section_shows_curves_held_out_accuracy_and_the_comparison_with_sl_cai(full):
    _, text, _ = full
    body = text.split('data-section="dpo"', 1)[1].split("</section>", 1)[0]
    assert body.count("<img") == 3  # per-step curves, held-out accuracy, win rate vs SL-CAI
    assert "Held-out comparisons" in body and "revisions: after" in body and "0.83" in body
    assert "DPO vs SL-CAI on held-out prompts" in body and "win_rate_dpo" in body


def test_rates_are_percentages_with_sensible_digits(tmp_path):
    from constitutional.report.common import pct, pct_ci

    assert pct_ci(2.776e-17, [2.776e-17, 0.3903]) == "0% [0%, 39%]"  # was "0 [2.776e-17, 0.3903]"
    assert pct_ci(0.12, [0.05, 0.26]) == "12% [5%, 26%]"
    assert (pct(0.025), pct(0.004), pct(1.0), pct(None)) == ("2.5%", "0.4%", "100%", "–")
    run = make_run_dir(tmp_path / "run", stages=("eval",))
    results = _results()
    results["refusal"]["base"].update(harmful_refusal_rate=2.776e-17, harmful_ci=[2.776e-17, 0.3903])
    results["refusal"]["sl-cai"]["openings"] = [{"opening": "i'm here to", "count": 20, "share": 0.625}]
    _write(run / "eval" / "results.json", results)
    _, text, _ = _report(run, chains=0)
    body = text.split('data-section="behaviour"', 1)[1].split("</section>", 1)[0]
    assert "0% [0%, 39%]" in body and "e-17" not in body
    assert "50% [40%, 60%]" in body  # sl-cai: red-team refusal 0.5, interval [0.4, 0.6] in _results
    assert "&quot;i&#x27;m here to...&quot; 62%" in body or "&quot;i&#x27;m here to...&quot; 62.5%" in body  # its stock opening, escaped
    assert ">50%<" in body and ">30%<" in body  # mc accuracy, truthfulness


def test_rl_curves_leave_out_the_whitened_reward():
    from constitutional.report.rl import rl_panels

    assert [k for k, _, _ in rl_panels({})] == ["rl/score", "rl/kl", "rl/length", "rl/entropy"]  # default: whitened, flat at 0
    assert "rl/reward" not in [k for k, _, _ in rl_panels({"normalize_reward": True, "length_penalty": 0.5})]
    assert "rl/reward" in [k for k, _, _ in rl_panels({"normalize_reward": False, "length_penalty": 0.5})]


def test_rl_section_says_why_the_reward_is_not_drawn(full):
    _, text, _ = full
    body = text.split('data-section="rl"', 1)[1].split("</section>", 1)[0]
    assert "whitened over each batch" in body and "win_rate_rl_cai" in body and "70%" in body and "[45%, 86%]" in body


def test_record_text_is_escaped(full):
    _, text, page = full
    assert [t for t, _ in page.tags].count("script") == 1  # the page's own image check only
    assert not any(a.get("src", "").startswith("http") for _, a in page.tags)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=&quot;http://evil.example/x.png&quot;&gt;" in text
    for where in ("prompt 1", "critique 0", "note with markup", "reward rose", "labeler fine"):
        assert where in text


def test_only_the_sections_whose_inputs_exist(tmp_path):
    summary, text, page = _report(make_run_dir(tmp_path / "run", stages=("revise", "sft")), chains=1)
    assert summary["sections"] == ["overview", "revision-quality", "sft", "chains"]
    assert summary["missing"] == ["elo", "revision-rounds", "behaviour", "preference-model", "labeler", "rl", "dpo", "distill"]
    assert page.sections["elo"] == "missing" and "not run: cai eval" in text
    assert "not run: cai train-pm" in text and "not run: cai label" in text and "not run: cai rl" in text and "not run: cai distill" in text
    assert "not run: cai dpo" in text
    assert summary["images"] == len(page.images) == 1  # the SFT loss curve
    assert text.count('<article class="chain">') == 1 and "rt-0001" in text  # usable chains first
    assert summary["report"] == str(tmp_path / "run" / "report" / "report.html")
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == ["report.html"]  # no temp file left


def test_revision_quality_from_the_summary_or_recomputed_from_the_records(tmp_path):
    from constitutional import revision_quality as rq

    run = make_run_dir(tmp_path / "run", stages=("revise",))
    records = [dict(_revision(i, usable=True), final_response=text, initial_response="Sure, step one.")
               for i, text in enumerate(["I can't help with that.", "The request is harmful.", "Please talk to a counsellor instead."])]
    _write(run / "revise" / "revisions.jsonl", records)
    _, text, page = _report(run, chains=0)
    assert page.sections["revision-quality"] == "shown" and "3 of 3 chains have a usable final revision" in text
    assert "<td>all</td><td>3</td><td>67%</td><td>33%</td><td>33%</td><td>–</td>" in text  # addresses, declines, redirects, few-shot unknown
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.setdefault("stages", {})["revise"] = {"status": "done", "summary": {"quality": rq.summarise(records, "I can't help with that.")}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    _, text, _ = _report(run, chains=0)
    assert "<td>all</td><td>3</td><td>67%</td><td>33%</td><td>33%</td><td>33%</td>" in text  # the first one repeats the "few-shot" text


def test_tolerates_nulls_and_missing_keys(tmp_path):
    run = make_run_dir(tmp_path / "run", stages=("eval", "distill"))
    _write(run / "eval" / "results.json", {"models": {}, "harmlessness": {"elo": {"a": {"elo": 1.0, "ci": None}}, "pm_score": None},
                                           "helpfulness": None, "refusal": {"a": {"harmful_refusal_rate": None}}, "mc": None,
                                           "truthfulness": {}, "injection": None, "revision_rounds": None, "notes": None})
    _write(run / "distill" / "eval.json", {"kl_before": 0.4})
    _write(run / "rl" / "metrics.jsonl", [{"step": 1, "rl/kl": 0.0}, {"step": 2, "rl/kl": 0.1}])
    summary, text, page = _report(run, chains=0, output=str(tmp_path / "out" / "r.html"))
    assert summary["report"] == str(tmp_path / "out" / "r.html")
    assert summary["sections"] == ["overview", "elo", "behaviour", "rl", "distill"]
    assert "not measured: eval/results.json has no revision_rounds" in text and "not shown: report.chains is 0" in text
    assert "no model has both Elo scores" in text


def test_an_unreadable_file_becomes_a_note(tmp_path):
    run = make_run_dir(tmp_path / "run", stages=("eval", "sft"))
    (run / "eval" / "results.json").write_text('{"models": ', encoding="utf-8")
    summary, text, _ = _report(run)
    assert {"elo", "revision-rounds", "behaviour"} <= set(summary["missing"]) and "sft" in summary["sections"]
    assert "unreadable: eval/results.json" in text


def test_every_config_field_is_documented():
    rows = field_help(report.Config)
    assert [r[0] for r in rows] == ["title", "chains", "output"] and all(r[2] for r in rows)


def test_behaviour_places_refusal_against_over_refusal(tmp_path, monkeypatch):
    """The trade-off plane gets one point per model: (benign refused, harmful refused), both intervals."""
    from constitutional.report import plots

    seen = {}
    draw = plots.refusal_tradeoff
    monkeypatch.setattr(plots, "refusal_tradeoff", lambda points: seen.update(points) or draw(points))
    run = make_run_dir(tmp_path / "run", stages=("eval",))
    results = _results()
    _write(run / "eval" / "results.json", results)
    _, text, _ = _report(run, chains=0)
    body = text.split('data-section="behaviour"', 1)[1].split("</section>", 1)[0]
    assert "harmless but evasive" in body and body.count("<img") >= 2
    ref = results["refusal"]
    assert seen == {n: (v["benign_refusal_rate"], v["benign_ci"], v["harmful_refusal_rate"], v["harmful_ci"]) for n, v in ref.items()}
