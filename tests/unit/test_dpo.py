"""`cai dpo`: the soft DPO loss against float64 brute force and TRL, the data it is built from, and the
stage end to end on the tiny model (a learnable marker word: held-out accuracy rises), resume, bad input."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from constitutional.cli import main
from constitutional.dpo_math import completion_logps, pair_metrics, soft_dpo_loss
from constitutional.errors import UserError
from constitutional.run import RunDir, read_jsonl
from constitutional.stages import dpo

WORDS = "flour water yeast salt knead rise bake oven answer response options harmful ethical rewrite".split()


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _cfg(model_dir, **kw) -> dpo.Config:
    base = dict(policy=str(model_dir), dtype="float32", eval_prompts=0, save_steps=100, batch_size=4, max_steps=4, learning_rate=1e-3)
    return dpo.Config(**{**base, **kw})


def _marker_preferences(n=80, n_test=20, p=0.9, seed=0):
    """Chosen responses contain "bread", rejected ones another word (all in the tiny tokenizer's corpus, so
    both sides have about as many tokens): a signal the tiny model can learn."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = " ".join(rng.choice(WORDS) for _ in range(3)), " ".join(rng.choice(WORDS) for _ in range(3))
        out.append({"id": f"m{i}", "prompt": f"Question {i}: {rng.choice(WORDS)}?", "chosen": f"{a} bread {b}",
                    "rejected": f"{a} {rng.choice(WORDS)} {b}", "p_chosen": p, "split": "test" if i < n_test else "train"})
    return out


# ---------------------------------------------------------------- the maths
def _brute_loss(pc, pr, rc, rr, p, beta):
    total = 0.0
    for i in range(len(p)):
        x = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
        log_sig = lambda z: -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))  # noqa: E731
        total += -(p[i] * log_sig(x) + (1 - p[i]) * log_sig(-x))
    return total / len(p)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_soft_loss_and_gradient_match_float64_brute_force(beta):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(6, generator=g, dtype=torch.float64) * 20 for _ in range(4)]  # log-probs of sequences
    p = torch.tensor([0.0, 0.3, 0.5, 0.52, 0.9, 1.0], dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    loss = soft_dpo_loss(*leaves, p, beta)
    loss.backward()
    values = [x.tolist() for x in inputs]
    assert loss.item() == pytest.approx(_brute_loss(*values, p.tolist(), beta), rel=1e-12)
    h = 1e-6
    for k, leaf in enumerate(leaves):  # central differences of the brute force, every input
        for i in range(6):
            up = [list(v) for v in values]
            down = [list(v) for v in values]
            up[k][i] += h
            down[k][i] -= h
            fd = (_brute_loss(*up, p.tolist(), beta) - _brute_loss(*down, p.tolist(), beta)) / (2 * h)
            assert leaf.grad[i].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # = TRL's sigmoid loss -log σ(βΔ) plus (1 - p)·βΔ, since log σ(x) - log σ(-x) = x
    delta = (inputs[0] - inputs[2]) - (inputs[1] - inputs[3])
    sigmoid = -torch.nn.functional.logsigmoid(beta * delta)
    assert loss.item() == pytest.approx((sigmoid + (1 - p) * beta * delta).mean().item(), rel=1e-12)
    ones = torch.ones(6, dtype=torch.float64)
    assert soft_dpo_loss(*inputs, ones, beta).item() == pytest.approx(sigmoid.mean().item(), rel=1e-12)


def test_soft_loss_optimum_is_logit_p_and_stays_finite():
    for p in (0.52, 0.7, 0.95):
        delta = torch.tensor([math.log(p / (1 - p)) / 0.5], dtype=torch.float64, requires_grad=True)
        soft_dpo_loss(delta, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                      torch.zeros(1, dtype=torch.float64), torch.tensor([p], dtype=torch.float64), 0.5).backward()
        assert abs(delta.grad.item()) < 1e-12  # βΔ = logit(p) is the minimum
    huge = torch.tensor([1e4, -1e4])
    loss = soft_dpo_loss(huge, torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.tensor([0.7, 0.7]), 1.0)
    assert math.isfinite(loss.item())
    zeros = torch.zeros(2, dtype=torch.bfloat16)
    bf16 = soft_dpo_loss(torch.tensor([1.5, -2.0], dtype=torch.bfloat16), zeros, zeros, zeros, torch.tensor([1.0, 0.5]), 1.0)
    assert bf16.dtype == torch.float32  # half-precision log-probs are upcast before the loss


def test_completion_logps_match_brute_force():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = completion_logps(logits, labels, mask)
    for n in range(3):
        want = sum(logits[n, t, labels[n, t]].item() - math.log(sum(math.exp(v) for v in logits[n, t].tolist()))
                   for t in range(5) if mask[n, t])
        assert out[n].item() == pytest.approx(want, abs=1e-5)
    assert out[2].item() == 0.0 and out.dtype == torch.float32


def test_pair_metrics_by_hand():
    assert pair_metrics([-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0, -3.0, -5.0]) == {"count": 4, "accuracy": 0.5, "margin": 0.25}
    assert pair_metrics([], []) == {"count": 0, "accuracy": None, "margin": None}
    with pytest.raises(ValueError):
        pair_metrics([1.0], [])


# ---------------------------------------------------------------- against TRL
def test_trainer_loss_on_a_collated_batch_equals_the_pure_function_and_trls(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from constitutional.stages.preference import Comparison

    reference = tmp_path / "reference"  # other weights, the same tokenizer: Δ != 0
    perturbed = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(0.05 * torch.randn_like(param))
    perturbed.save_pretrained(reference)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reference)
    prompts = [[{"role": "user", "content": "How do I bake bread?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Is it harmful?"}]]
    p_values = [1.0, 0.9, 0.75, 0.52]
    pairs = [("preferences", Comparison(f"c{i}", prompts[i % 2], f"A kind answer number {i}.", f"No{'!' * i}", p, "train"))
             for i, p in enumerate(p_values)]
    trainer = dpo.build_trainer(_cfg(tiny_model_dir, beta=0.5), pairs, [], str(tiny_model_dir), str(reference), tmp_path / "ckpt")
    batch = next(iter(trainer.get_train_dataloader()))  # through remove_unused_columns and the collator
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "p_chosen"}
    assert sorted(batch["p_chosen"].tolist()) == pytest.approx(sorted(p_values))
    model = trainer.model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    assert loss.requires_grad

    def logps(m):  # float64, one sequence at a time
        out = []
        with torch.no_grad():
            for ids, att, comp in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
                n = int(att.sum())
                lp = torch.log_softmax(m(input_ids=ids[None, :n]).logits[0].double(), -1)
                out.append(sum(lp[t - 1, ids[t]].item() for t in range(1, n) if comp[t]))
        return torch.tensor(out, dtype=torch.float64)

    pol, ref = logps(model), logps(trainer.ref_model)
    assert (pol != ref).all()
    want = soft_dpo_loss(pol[:4], pol[4:], ref[:4], ref[4:], batch["p_chosen"].double(), 0.5)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    _, parts = trainer.compute_loss(model, dict(batch), return_outputs=True)
    for key, value in (("policy_chosen", pol[:4]), ("policy_rejected", pol[4:]), ("reference_chosen", ref[:4]), ("reference_rejected", ref[4:])):
        assert parts[key].tolist() == pytest.approx(value.tolist(), abs=1e-4), key
    # With every target 1 the loss is TRL's own sigmoid loss (TRL computes it with its fused LM head).
    hard = {k: v for k, v in batch.items() if k != "p_chosen"}
    trl_loss = DPOTrainer.compute_loss(trainer, model, dict(hard))
    trainer.hard = True
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert trl_loss.item() != pytest.approx(loss.item(), rel=1e-3)  # the soft targets did change the loss


def test_micro_batches_accumulate_the_batch_gradient(tiny_model_dir, tmp_path, monkeypatch):
    """A batch of 4 comparisons in 2 micro-batches of 2 (memory_mb, training.plan_step): the same
    examples per optimizer step, the same first-step gradient."""
    from conftest import first_step_gradient

    from constitutional.stages.preference import Comparison
    from constitutional.training import StepPlan

    pairs = [("preferences", Comparison(f"c{i}", [{"role": "user", "content": f"Question {i}?"}], f"A kind answer {i}.", f"No{'!' * i}", p, "train"))
             for i, p in enumerate([1.0, 0.8, 0.6, 0.9])]
    grads = {}
    for m in (1, 2):
        monkeypatch.setattr(dpo, "plan_step", lambda *a, m=m, **k: StepPlan(m, False, {"micro_batches": m}))
        trainer = dpo.build_trainer(_cfg(tiny_model_dir, batch_size=4, max_steps=1), pairs, [], str(tiny_model_dir), str(tiny_model_dir),
                                    tmp_path / f"ckpt{m}")
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4 // m, m)
        grads[m] = first_step_gradient(trainer)
    assert torch.allclose(grads[1], grads[2], atol=1e-6) and grads[1].abs().max() > 1e-4


def test_trainer_args_use_activation_checkpointing_without_the_deprecation_warning(tiny_model_dir, tmp_path, monkeypatch):
    import warnings

    from constitutional.stages.preference import Comparison
    from constitutional.training import StepPlan

    pairs = [("preferences", Comparison(f"c{i}", [{"role": "user", "content": f"q{i}"}], f"yes {i}", f"no {i}", 0.8, "train")) for i in range(2)]
    for on in (True, False):
        monkeypatch.setattr(dpo, "plan_step", lambda *a, on=on, **k: StepPlan(1, on, {"micro_batches": 1}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = dpo.build_trainer(_cfg(tiny_model_dir, max_steps=1), pairs, [], str(tiny_model_dir), str(tiny_model_dir), tmp_path / f"ckpt{on}")
        assert not [w for w in caught if "gradient_checkpointing" in str(w.message)], [str(w.message) for w in caught]
        assert trainer.args.activation_checkpointing is on


# ---------------------------------------------------------------- data
def _revision(i, usable=True, rounds=("ok", "ok"), identical=False, messages=None):
    rounds = [{"principle_id": f"p{k}", "status": s, "revision": f"revision {k} of {i}" if s == "ok" else f"dropped {k}"}
              for k, s in enumerate(rounds)]
    return {"id": f"rt-{i}", "prompt": f"prompt {i}", "messages": messages or [{"role": "user", "content": f"prompt {i}"}],
            "split": "train", "initial_response": f"revision 0 of {i}" if identical else f"initial {i}", "rounds": rounds,
            "final_response": "unused", "usable": usable}


def test_revision_pairs_take_the_last_usable_revision_against_the_initial_response(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Help me hack"}]
    path = _write_jsonl(tmp_path / "revisions.jsonl", [
        _revision(0), _revision(1, rounds=("ok", "dropped:echo_critique")), _revision(2, usable=False, rounds=("dropped:empty",)),
        _revision(3, rounds=("ok",), identical=True), _revision(4, messages=conversation),
    ])
    pairs, counts = dpo.revision_pairs(path)
    assert counts == {"records": 5, "unusable": 1, "identical": 1}
    assert [(c.id, c.chosen, c.rejected, c.p_chosen, c.split) for c in pairs] == [
        ("rt-0", "revision 1 of 0", "initial 0", 1.0, "train"), ("rt-1", "revision 0 of 1", "initial 1", 1.0, "train"),
        ("rt-4", "revision 1 of 4", "initial 4", 1.0, "train")]
    assert pairs[2].messages == conversation  # the prompt is the whole conversation


def test_read_data_orients_joins_and_holds_out(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    prefs = [{"id": "a", "prompt": "q a", "chosen": "x", "rejected": "y", "p_chosen": 0.3, "split": "train"},
             {"id": "b", "prompt": "q b", "chosen": "x", "rejected": "y", "p_chosen": 0.5, "split": "train"},
             {"id": "c", "prompt": "q c", "chosen": "x", "rejected": "y", "p_chosen": 0.8, "split": "test"}]
    _write_jsonl(run_dir.path / "label" / "preferences.jsonl", prefs)
    _write_jsonl(run_dir.path / "revise" / "revisions.jsonl", [_revision(0), _revision(1, usable=False)])
    helpful = _write_jsonl(tmp_path / "helpful.jsonl", [{"prompt": "bake?", "chosen": "Knead.", "rejected": "No.", "split": "test"}])
    train, held, counts = dpo.read_data(dpo.Config(data="preferences+revisions", helpful=str(helpful), heldout=0.0), run_dir)
    by_id = {c.id: (s, c) for s, c in train + held}
    assert by_id["preferences/a"][1].chosen == "y" and by_id["preferences/a"][1].p_chosen == pytest.approx(0.7)  # flipped to p >= 0.5
    assert [c.id for _, c in held] == ["preferences/c"]  # test split held out; helpful comparisons are always trained on
    assert {c.id for _, c in train} == {"preferences/a", "preferences/b", "revisions/rt-0", "helpful/helpful-00000"}  # default ids count rows from 0
    assert counts["train"] == {"preferences": 2, "revisions": 1, "helpful": 1} and counts["heldout"] == {"preferences": 1}
    assert counts["revision_records"]["unusable"] == 1 and counts["ties_dropped"] == 0
    train, _, counts = dpo.read_data(dpo.Config(data="preferences", loss="sigmoid", heldout=0.0), run_dir)
    assert counts["ties_dropped"] == 1 and [c.id for _, c in train] == ["preferences/a"]  # a hard label needs a preference


# ---------------------------------------------------------------- the stage
def test_held_out_accuracy_rises_on_a_learnable_signal(tiny_model_dir, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    _write_jsonl(run_dir.path / "label" / "preferences.jsonl", _marker_preferences())
    summary = dpo.run(_cfg(tiny_model_dir, heldout=0.0, max_steps=30, batch_size=8, learning_rate=3e-3, beta=0.1), run_dir)
    out = run_dir.path / "dpo"
    held = json.loads((out / "heldout.json").read_text())
    assert held["count"] == summary["heldout_comparisons"] == 20
    a = held["all"]
    # before: 0.65-0.8 (log π(chosen) > log π(rejected)) on the seeds tried, after: 1.0 on each
    assert a["after"]["accuracy"] >= 0.95 > a["before"]["accuracy"] and a["after"]["margin"] > a["before"]["margin"] + 10, a
    assert a["reward"]["accuracy"] >= 0.95 and 0 < a["reward"]["margin"] < math.log(0.9 / 0.1)  # heading for βΔ = logit(p)
    # the implicit reward margin is β x the change of the log-likelihood margin (the reference is the starting policy)
    assert a["reward"]["margin"] == pytest.approx(0.1 * (a["after"]["margin"] - a["before"]["margin"]), rel=1e-3, abs=1e-4)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("dpo/loss", "dpo/margin", "dpo/accuracy", "dpo/chosen_reward", "dpo/rejected_reward", "dpo/kl", "dpo/lr"):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in records), key
    assert records[0]["dpo/kl"] == pytest.approx(0.0, abs=1e-6) and records[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-6)
    assert records[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # Δ = 0 before the first update
    assert records[-1]["dpo/kl"] > 0 and records[-1]["dpo/accuracy"] > 0.5 and records[-1]["dpo/loss"] < records[0]["dpo/loss"]
    assert summary["steps"] == 30 and summary["heldout_accuracy_after"] == a["after"]["accuracy"] and summary["seconds_per_step"] > 0
    assert summary["tokens_per_second"] > 0  # counted by our compute_loss, as TRL counts it
    assert summary["comparisons"]["train"] == {"preferences": 60} and summary["comparisons"]["dropped_too_long"] == 0
    assert sorted(p.name for p in out.iterdir()) == ["heldout.json", "metrics.jsonl", "model", "train.json"]  # no checkpoints left
    card = (out / "model" / "README.md").read_text()
    assert "DPO model" in card and "All weights trained" in card and (out / "model" / "model.safetensors").is_file()
    assert not (out / "model" / "training_args.bin").exists()


def test_held_out_scores_are_float32_after_bf16_training(tiny_model_dir, tmp_path):
    """Trained under bf16 autocast, the held-out log-probs still agree: reward margin = β·(after - before)."""
    run_dir = RunDir(tmp_path / "run")
    _write_jsonl(run_dir.path / "label" / "preferences.jsonl", _marker_preferences(n=24, n_test=8))
    summary = dpo.run(_cfg(tiny_model_dir, dtype="bfloat16", heldout=0.0, max_steps=3, learning_rate=3e-3), run_dir)
    a = json.loads((run_dir.path / "dpo" / "heldout.json").read_text())["all"]
    assert summary["dtype"] == "bfloat16" and a["after"]["margin"] != a["before"]["margin"]
    assert a["reward"]["margin"] == pytest.approx(0.1 * (a["after"]["margin"] - a["before"]["margin"]), rel=1e-4, abs=1e-5)


def test_resumes_after_a_crash_to_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from constitutional.dpo_trainer import SoftDPOTrainer

    cfg = _cfg(tiny_model_dir, max_steps=4, save_steps=2, batch_size=2, heldout=0.0)
    prefs = _marker_preferences(n=16, n_test=4)
    whole, crashed = RunDir(tmp_path / "whole"), RunDir(tmp_path / "crashed")
    for rd in (whole, crashed):
        _write_jsonl(rd.path / "label" / "preferences.jsonl", prefs)
    dpo.run(cfg, whole)
    original, calls = SoftDPOTrainer.compute_loss, {"n": 0}

    def crash_on_third_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for a kill after checkpoint-2
        return original(self, *a, **kw)

    monkeypatch.setattr(SoftDPOTrainer, "compute_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg, crashed)
    out = crashed.path / "dpo"
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "model").exists()
    monkeypatch.setattr(SoftDPOTrainer, "compute_loss", original)
    summary = dpo.run(cfg, crashed)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists()
    a, b = load_file(whole.path / "dpo" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    after = [json.loads((d / "heldout.json").read_text())["all"]["after"] for d in (out, whole.path / "dpo")]
    assert after[0]["margin"] == pytest.approx(after[1]["margin"], abs=1e-4)


def test_revisions_with_lora_and_the_comparison_with_sl_cai(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    pm_dir = tmp_path / "pm"
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    pm.config.pad_token_id = 2
    pm.save_pretrained(pm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pm_dir)
    run_dir = RunDir(tmp_path / "run")
    run_dir.manifest["config"] = {"label": {"fewshot": 1, "batch_size": 4}}
    _write_jsonl(run_dir.path / "revise" / "revisions.jsonl", [_revision(i) for i in range(6)] + [_revision(6, usable=False)])
    cfg = _cfg(tiny_model_dir, data="revisions", loss="sigmoid", lora=True, lora_r=4, lora_alpha=8, max_steps=2, batch_size=2, heldout=0.3,
               eval_prompts=2, max_new_tokens=8, feedback_model=str(tiny_model_dir), reward_model=str(pm_dir))
    summary = dpo.run(cfg, run_dir)
    out = run_dir.path / "dpo"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in model.named_parameters()) and not (out / "model" / "adapter_config.json").exists()
    assert summary["comparisons"]["revision_records"] == {"records": 7, "unusable": 1, "identical": 0}
    assert sum(summary["comparisons"]["train"].values()) + summary["heldout_comparisons"] == 6
    records = read_jsonl(out / "metrics.jsonl")
    assert records[0]["dpo/kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the policy with its adapter off
    ev = json.loads((out / "eval.json").read_text())
    a = ev["all"]
    assert a["prompts"] == 4 and set(ev["by_set"]) == {"redteam", "helpful"} and ev["policies"]["dpo"] == str(out / "model")
    assert a["wins"] + a["ties"] + a["losses"] == 4 and 0 <= a["win_rate_ci95"][0] <= a["win_rate_dpo"] <= a["win_rate_ci95"][1] <= 1
    assert a["pm_score_dpo"] is not None and a["pm_score_difference_ci95"][0] <= a["pm_score_difference"] <= a["pm_score_difference_ci95"][1]
    assert math.isfinite(a["kl_dpo_to_sl_nats_per_response"]) and ev["reward_model"] == str(pm_dir)
    samples = read_jsonl(out / "eval_samples.jsonl")
    assert len(samples) == 4 and all({"dpo", "sl_cai", "score_dpo", "p_dpo"} <= set(s) for s in samples)
    assert summary["eval"]["win_rate_dpo"] == a["win_rate_dpo"]
    card = (out / "model" / "README.md").read_text()
    assert "LoRA adapter merged" in card and "DPO vs SL-CAI" in card and "win rate of DPO" in card


def test_without_a_preference_model_the_comparison_has_no_pm_scores(tiny_model_dir, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.manifest["config"] = {"label": {"fewshot": 0, "batch_size": 4}}
    _write_jsonl(run_dir.path / "label" / "preferences.jsonl", _marker_preferences(n=8, n_test=2))
    summary = dpo.run(_cfg(tiny_model_dir, max_steps=1, eval_prompts=1, max_new_tokens=4, feedback_model=str(tiny_model_dir), helpful_prompts=""), run_dir)
    ev = json.loads((run_dir.path / "dpo" / "eval.json").read_text())
    assert ev["reward_model"] is None and ev["all"]["pm_score_dpo"] is None and ev["all"]["pm_score_difference"] is None
    assert summary["eval"]["prompts"] == 1 and "no PM scores" in (run_dir.path / "dpo" / "model" / "README.md").read_text()


# ---------------------------------------------------------------- bad input
def _mismatched_reference(tiny_model_dir, path):
    from transformers import AutoTokenizer

    shutil.copytree(tiny_model_dir, path)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("no file", "label/preferences.jsonl: not found; run `cai label` first"),
    ("no records", "no training comparisons (0 read"),
    ("missing key", "preferences.jsonl:1: missing field 'rejected'"),
    ("revision missing key", "revisions.jsonl:1: a revision record needs `usable`"),
    ("p outside", "(p_chosen): 1.5 is not a probability in [0, 1]"),
    ("reference tokenizer", "dpo.reference"),
    ("bad data", "dpo.data 'prefs': use preferences, revisions"),
    ("bad loss", "dpo.loss 'ipo': use soft or sigmoid"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, case, message):
    run = tmp_path / "run"
    prefs = run / "label" / "preferences.jsonl"
    args = ["--set", f"policy={tiny_model_dir}", "--set", "eval_prompts=0"]
    good = {"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "p_chosen": 0.7, "split": "train"}
    if case == "no records":
        _write_jsonl(prefs, [])
    elif case == "missing key":
        _write_jsonl(prefs, [{k: v for k, v in good.items() if k != "rejected"}])
    elif case == "revision missing key":
        _write_jsonl(run / "revise" / "revisions.jsonl", [{"id": "r", "messages": [{"role": "user", "content": "hi"}], "rounds": []}])
        args += ["--set", "data=revisions"]
    elif case == "p outside":
        _write_jsonl(prefs, [{**good, "p_chosen": 1.5}])
    elif case != "no file":
        _write_jsonl(prefs, [good])
        if case == "reference tokenizer":
            args += ["--set", f"reference={_mismatched_reference(tiny_model_dir, tmp_path / 'other')}"]
        else:
            args += ["--set", "data=prefs" if case == "bad data" else "loss=ipo"]
    assert main(["dpo", "--run-dir", str(run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cai: error: ") and "\n" not in err and message in err, err
    assert not (run / "dpo" / "model").exists()


def test_mismatched_reference_names_the_difference(tiny_model_dir, tmp_path):
    other = _mismatched_reference(tiny_model_dir, tmp_path / "other")
    with pytest.raises(UserError, match=r"its tokenizer does not match the policy's \(\d+ vs \d+ tokens; e.g. '<\|extra\|>'"):
        dpo.check_tokenizers(str(tiny_model_dir), str(other))
    dpo.check_tokenizers(str(tiny_model_dir), str(tiny_model_dir))  # the same tokenizer passes


def test_checkpointing_and_tracking_settings_are_checked():
    from constitutional.errors import UserError as E

    with pytest.raises(E, match="dpo.gradient_checkpointing"):
        dpo.check_config(dpo.Config(gradient_checkpointing="sometimes"))
    with pytest.raises(E, match="dpo.report_to"):
        dpo.check_config(dpo.Config(report_to="mlflow"))
