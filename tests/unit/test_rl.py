"""`cai rl` (RL-CAI): the RL arithmetic against brute force and TRL, and the stage on the tiny model.

The learning-signal tests use a programmatic reward (the share of vowels in the response): the tiny
random model starts near 0.2 and RLOO must raise it within a dozen steps, on every seed tried.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from constitutional.errors import UserError
from constitutional.rl_math import (
    Z95,
    apply_length_penalty,
    bootstrap_mean_ci,
    kl_estimate,
    leave_one_out_baseline,
    normalize_rewards,
    rloo_advantages,
    wilson_interval,
)
from constitutional.run import RunDir, read_jsonl
from constitutional.stages import rl

VOWELS = set("aeiouAEIOU")


def vowel_share(prompts, responses):
    """Reward: the share of vowels among the response's characters."""
    return [sum(ch in VOWELS for ch in t) / max(1, len(t)) for t in responses]


def _cfg(model_dir, **kw) -> rl.Config:
    """Sized for the tiny model: 4 red-team + 4 helpful prompts, 2 prompts x 8 samples x 16 tokens per step."""
    base = dict(policy=str(model_dir), limit=4, max_steps=12, learning_rate=5e-2, batch_size=2, num_generations=8,
                max_new_tokens=16, dtype="float32", eval_prompts=0, save_steps=100, beta=0.05)
    return rl.Config(**{**base, **kw})


def _quarters(run_dir) -> tuple[float, float]:
    scores = [r["rl/score"] for r in read_jsonl(run_dir.path / "rl" / "metrics.jsonl")]
    k = max(1, len(scores) // 4)
    return sum(scores[:k]) / k, sum(scores[-k:]) / k


# ---------------------------------------------------------------- the maths
def test_leave_one_out_baseline_and_advantages_match_brute_force():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 4, generator=g, dtype=torch.float64)
    base = leave_one_out_baseline(rewards)
    for i, j in itertools.product(range(5), range(4)):
        others = [rewards[i, k].item() for k in range(4) if k != j]
        assert base[i, j].item() == pytest.approx(sum(others) / len(others), abs=1e-12)
    adv = rloo_advantages(rewards.reshape(-1), 4).view(5, 4)
    assert torch.allclose(adv, rewards - base)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12)  # each group sums to 0
    # RLOO advantage = G/(G-1) x (r - group mean)
    assert torch.allclose(adv, 4 / 3 * (rewards - rewards.mean(dim=1, keepdim=True)))
    with pytest.raises(ValueError):
        leave_one_out_baseline(torch.zeros(3, 1))
    with pytest.raises(ValueError):
        rloo_advantages(torch.zeros(7), 2)


def test_reward_normalisation_and_length_penalty():
    rewards = [0.3, -1.2, 2.0, 0.5]
    z = normalize_rewards(rewards)
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 4)
    assert z == pytest.approx([(r - mean) / std for r in rewards])
    assert sum(z) == pytest.approx(0, abs=1e-12) and sum(x * x for x in z) / 4 == pytest.approx(1)
    assert normalize_rewards([2.0, 2.0, 2.0]) == [0.0, 0.0, 0.0]  # no spread: only centred
    assert normalize_rewards([]) == []
    assert apply_length_penalty([1.0, 1.0, 0.0], [0, 50, 200], 0.4) == pytest.approx([1.0, 0.8, -0.8])
    with pytest.raises(ValueError):
        apply_length_penalty([1.0], [1, 2], 0.1)


def test_kl_estimators_are_unbiased_and_k3_is_never_negative():
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logp = torch.log_softmax(torch.randn(11, generator=g, dtype=torch.float64) * 2, -1)
        ref = torch.log_softmax(torch.randn(11, generator=g, dtype=torch.float64) * 2, -1)
        exact = (logp.exp() * (logp - ref)).sum()  # KL(p || q), every outcome weighted by p
        for kind in ("k1", "k3"):
            assert (logp.exp() * kl_estimate(logp, ref, kind)).sum().item() == pytest.approx(exact.item(), rel=1e-10)
        assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert kl_estimate(torch.tensor([-1.0]), torch.tensor([-1.0]), "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k2")


def test_bootstrap_interval_matches_exact_enumeration():
    values = [0.1, -0.4, 0.9, 0.3]
    means = sorted(sum(c) / 4 for c in itertools.product(values, repeat=4))  # all 4^4 equally likely resamples
    lo, hi = bootstrap_mean_ci(values, n_boot=20000, seed=3)
    assert lo == pytest.approx(means[int(0.025 * 256)], abs=0.03)
    assert hi == pytest.approx(means[int(0.975 * 256)], abs=0.03)
    assert bootstrap_mean_ci([0.5] * 6) == (0.5, 0.5)
    assert bootstrap_mean_ci([]) == (None, None)
    assert bootstrap_mean_ci(values, seed=1) == bootstrap_mean_ci(values, seed=1)


def test_wilson_interval_solves_its_defining_equation():
    def bisect(f, a, b):
        for _ in range(200):
            m = (a + b) / 2
            a, b = (m, b) if f(a) * f(m) > 0 else (a, m)
        return (a + b) / 2

    for s, n in [(3, 10), (7.5, 12), (1, 4), (19, 20)]:
        phat = s / n
        f = lambda p: (phat - p) ** 2 - Z95**2 * p * (1 - p) / n  # noqa: E731
        lo, hi = wilson_interval(s, n)
        assert lo == pytest.approx(bisect(f, 0.0, phat), abs=1e-9)
        assert hi == pytest.approx(bisect(f, phat, 1.0), abs=1e-9)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (None, None)


def test_policy_reward_scores_text_then_normalises_then_penalises_length():
    seen, logged = [], {}
    score = lambda prompts, texts: (seen.append((prompts, texts)), [1.0, 3.0])[1]  # noqa: E731
    reward = rl.PolicyReward(score, normalize=True, length_penalty=0.5)
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    out = reward(prompts=prompts, completions=[[{"role": "assistant", "content": " a "}], [{"role": "assistant", "content": "b"}]],
                 completion_ids=[[5, 6], [7, 8, 9, 10]], log_metric=lambda k, v: logged.setdefault(k, v), id=["x", "x"], trainer_state=None)
    assert seen == [(prompts, ["a", "b"])]
    assert out == pytest.approx([-1.0 - 0.5 * 2 / 100, 1.0 - 0.5 * 4 / 100])
    assert logged == {"rl/score": 2.0, "rl/score_std": 1.0}  # the raw score, before shaping
    assert rl.PolicyReward(score, normalize=False, length_penalty=0.0)(prompts, ["a", "b"], [[1], [2]]) == [1.0, 3.0]


# ---------------------------------------------------------------- against TRL
def test_rloo_advantages_equal_trls(tiny_model_dir, tmp_path):
    """With beta = 0 (no KL term), TRL's RLOO advantages are exactly `rloo_advantages` of the rewards."""
    cfg = _cfg(tiny_model_dir, max_steps=1, beta=0.0, normalize_reward=False, num_generations=4)
    rows = [{"prompt": [{"role": "user", "content": f"How do I bake bread {i}?"}], "id": str(i), "source": "redteam"} for i in range(4)]
    reward = rl.PolicyReward(vowel_share, normalize=False, length_penalty=0.0)
    trainer = rl.build_trainer(cfg, rows, str(tiny_model_dir), reward, tmp_path / "ckpt")
    trainer.train()
    rewards = torch.tensor(list(trainer._logs["rewards"]["preference_model"]), dtype=torch.float64)  # TRL internals (1.16)
    theirs = torch.tensor(list(trainer._logs["advantages"]), dtype=torch.float64)
    assert rewards.numel() == 8 and rewards.std() > 0
    assert torch.allclose(theirs, rloo_advantages(rewards, 4), atol=1e-6)


def test_backend_rollouts_carry_the_logprobs_trl_expects(tiny_model_dir, tmp_path):
    """The step's completions are the hf backend's samples (n = G per prompt, the step's seed, the
    end-of-turn token appended when a sample ended), and the per-token log-probs TRL computes from
    them, the policy's (old) and the reference's, equal a brute-force forward of the same ids."""
    from constitutional.backends import GenerationParams
    from constitutional.backends.hf import HFBackend
    from constitutional.rollouts import SEED_STRIDE

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the tiny model with its end-of-turn token made likely, so that some samples end and some are cut
    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32), AutoTokenizer.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        h = model.model(input_ids=tok("How do I bake bread? Mix flour and water", return_tensors="pt")["input_ids"]).last_hidden_state[0].mean(0)
        model.model.embed_tokens.weight[tok.eos_token_id] += 4.0 * h / h.norm() ** 2
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")

    G, T, new = 4, 0.9, 16
    cfg = _cfg(tmp_path / "policy", max_steps=1, beta=0.05, num_generations=G, temperature=T, max_new_tokens=new, seed=3)
    rows = [{"prompt": [{"role": "user", "content": f"How do I bake bread {i}?"}], "id": str(i), "source": "redteam"} for i in range(2)]
    trainer = rl.build_trainer(cfg, rows, str(tmp_path / "policy"), rl.PolicyReward(vowel_share, True, 0.0), tmp_path / "ckpt")
    trainer.state.global_step = 5  # the seed follows the step
    trainer.model.train()  # as in training
    out = trainer._generate_and_score_completions([rows[0]] * G + [rows[1]] * G)  # TRL's layout: each prompt G times
    model, ref, tok = trainer.model, trainer.ref_model, trainer.processing_class
    assert model.training  # the backend's eval() is undone

    backend = HFBackend.from_model(model, tok)
    expected = backend.generate_ids([r["prompt"] for r in rows], GenerationParams(max_new_tokens=new, temperature=T, n=G, seed=3 + 5 * SEED_STRIDE))
    (eos,) = backend.eos_ids
    completions = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
    assert completions == [e + [eos] if len(e) < new else e for e in expected]
    assert 0 < sum(c[-1] == eos for c in completions) < len(completions)  # some ended, some were cut
    assert len({tuple(c) for c in completions[:G]}) > 1  # a prompt's G samples differ

    per_token = {}
    with torch.no_grad():
        for name, m in (("policy", model), ("ref", ref)):
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            per_token[name] = trainer._get_per_token_logps_and_entropies(m, ids, mask, out["completion_ids"].size(1))[0]
            for i, comp in enumerate(completions):
                prompt = out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()
                x = torch.tensor([prompt + comp])
                logits = m(input_ids=x).logits[0, len(prompt) - 1 : -1].float() / T
                brute = torch.log_softmax(logits, -1).gather(-1, x[0, len(prompt):, None]).squeeze(-1)
                assert torch.allclose(per_token[name][i, : len(comp)], brute, atol=1e-5), (name, i)
                if name == "policy":  # the rollout's old log-prob, as TRL stores it for the loss
                    assert out["old_logps"][i].item() == pytest.approx(brute.sum().item(), abs=1e-4)


def test_bf16_rollouts_sample_from_a_bf16_copy_of_the_policy(tiny_model_dir, tmp_path):
    """Under bf16 autocast on the CPU the step's completions come from a plain bf16 copy of the policy
    as it is at that step (`decode_copy`): the same samples as the backend gives on that copy, while
    the policy under training keeps its float32 weights."""
    from constitutional.backends import GenerationParams
    from constitutional.backends.hf import HFBackend
    from constitutional.rollouts import SEED_STRIDE, decode_copy

    G, new = 4, 12
    cfg = _cfg(tiny_model_dir, max_steps=1, num_generations=G, max_new_tokens=new, dtype="bfloat16", seed=2, temperature=0.9)
    rows = [{"prompt": [{"role": "user", "content": f"How do I bake bread {i}?"}], "id": str(i), "source": "redteam"} for i in range(2)]
    trainer = rl.build_trainer(cfg, rows, str(tiny_model_dir), rl.PolicyReward(vowel_share, True, 0.0), tmp_path / "ckpt")
    assert trainer.args.bf16
    with torch.no_grad():  # weights unlike the saved model's, so the copy must be taken from the policy itself
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trainer.state.global_step = 2
    out = trainer._generate_and_score_completions([rows[0]] * G + [rows[1]] * G)

    policy = trainer.model
    copy = decode_copy(policy, torch.bfloat16)
    assert next(policy.parameters()).dtype == torch.float32 and next(copy.parameters()).dtype == torch.bfloat16
    for name, w in copy.state_dict().items():
        assert torch.equal(w, policy.state_dict()[name].to(torch.bfloat16)), name
    assert copy.get_output_embeddings().weight.data_ptr() == copy.get_input_embeddings().weight.data_ptr()  # tied as in the policy
    backend = HFBackend.from_model(copy, trainer.processing_class)
    expected = backend.generate_ids([r["prompt"] for r in rows], GenerationParams(max_new_tokens=new, temperature=0.9, n=G, seed=2 + 2 * SEED_STRIDE))
    (eos,) = backend.eos_ids
    completions = [ids[m.bool()].tolist() for ids, m in zip(out["completion_ids"], out["completion_mask"])]
    assert completions == [e + [eos] if len(e) < new else e for e in expected]


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_micro_batches_accumulate_the_generation_gradient(tiny_model_dir, tmp_path, monkeypatch, algorithm):
    """One generation of B·G = 8 completions trained in 2 micro-batches of 4: the same first-step
    gradient as in one batch of 8 (same seed, so the same completions)."""
    from conftest import first_step_gradient

    from constitutional.training import StepPlan

    rows = [{"prompt": [{"role": "user", "content": f"How do I bake bread {i}?"}], "id": str(i), "source": "redteam"} for i in range(4)]
    grads = {}
    for m in (1, 2):
        monkeypatch.setattr(rl, "plan_step", lambda *a, m=m, **k: StepPlan(m, False, {"micro_batches": m}))
        cfg = _cfg(tiny_model_dir, max_steps=1, num_generations=4, algorithm=algorithm)
        trainer = rl.build_trainer(cfg, rows, str(tiny_model_dir), rl.PolicyReward(vowel_share, True, 0.0), tmp_path / f"ckpt{m}")
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps, trainer.args.steps_per_generation) == (8 // m, m, m)
        grads[m] = first_step_gradient(trainer)
    assert torch.allclose(grads[1], grads[2], atol=1e-6) and grads[1].abs().max() > 1e-4


# ---------------------------------------------------------------- the stage
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_raises_the_reward(tiny_model_dir, tmp_path, seed):
    run_dir = RunDir(tmp_path / "run")
    summary = rl.run(_cfg(tiny_model_dir, seed=seed), run_dir, reward_fn=vowel_share)
    first, last = _quarters(run_dir)
    assert last > first + 0.1, (first, last)
    assert summary["steps"] == 12 and summary["stopped_early"] is None and summary["warnings"] == []
    records = read_jsonl(run_dir.path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("rl/reward", "rl/reward_std", "rl/score", "rl/kl", "rl/length", "rl/entropy", "rl/lr", "rl/loss"):
        assert all(isinstance(r[key], float) and math.isfinite(r[key]) for r in records), key
    assert records[0]["rl/kl"] == 0.0 and records[-1]["rl/kl"] > 0  # policy == reference before the first update
    assert records[0]["rl/lr"] == pytest.approx(5e-2) and records[-1]["rl/lr"] < records[0]["rl/lr"]
    assert summary["seconds_per_step"] > 0 and summary["peak_memory_mb"] > 0 and summary["prompts"] == {"redteam": 4, "helpful": 4}


def test_grpo_raises_the_reward_with_kl_in_the_loss(tiny_model_dir, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    summary = rl.run(_cfg(tiny_model_dir, algorithm="grpo"), run_dir, reward_fn=vowel_share)
    first, last = _quarters(run_dir)
    assert last > first + 0.1, (first, last)
    assert summary["algorithm"] == "grpo" and summary["kl_last"] > 0


def test_kl_bound_stops_training_and_says_why(tiny_model_dir, tmp_path, capsys):
    run_dir = RunDir(tmp_path / "run")
    summary = rl.run(_cfg(tiny_model_dir, max_kl=1e-3), run_dir, reward_fn=vowel_share)
    stop = summary["stopped_early"]
    assert stop is not None and stop["step"] == summary["steps"] < 12 and stop["kl"] > 1e-3
    assert "max_kl" in stop["reason"] and "max_kl" in capsys.readouterr().err
    assert len(read_jsonl(run_dir.path / "rl" / "metrics.jsonl")) == stop["step"]
    assert (run_dir.path / "rl" / "model" / "config.json").is_file()


def test_chance_pm_warns_when_the_reward_climbs(tiny_model_dir, tmp_path, capsys):
    run_dir = RunDir(tmp_path / "run")
    (run_dir.path / "train-pm").mkdir()
    metrics = {"heldout": {"count": 20, "accuracy": 0.55}, "mc": {"count": 72, "accuracy": 0.49}}
    (run_dir.path / "train-pm" / "metrics.json").write_text(json.dumps(metrics))
    summary = rl.run(_cfg(tiny_model_dir), run_dir, reward_fn=vowel_share)
    assert len(summary["warnings"]) == 1 and "nothing to teach" in summary["warnings"][0]
    assert "held-out accuracy 0.55" in summary["warnings"][0] and "MC accuracy 0.49" in summary["warnings"][0]
    assert summary["pm_heldout_accuracy"] == 0.55
    assert "WARNING" in capsys.readouterr().err
    assert "WARNING" in (run_dir.path / "rl" / "model" / "README.md").read_text()
    # the rule itself: a PM at chance and a climbing reward; nothing otherwise
    assert rl.chance_warning(metrics, [0.1, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert rl.chance_warning(metrics, [0.5, 0.4, 0.3, 0.3, 0.2, 0.1]) is None
    assert rl.chance_warning({"heldout": {"accuracy": 0.8}, "mc": {"accuracy": 0.75}}, [0.1, 0.5, 0.9]) is None
    assert rl.chance_warning(None, [0.1, 0.5, 0.9]) is None


def test_resumes_from_the_newest_checkpoint(tiny_model_dir, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    cfg = _cfg(tiny_model_dir, max_steps=4, save_steps=2)
    calls = {"n": 0}

    def crash_on_third_step(prompts, responses):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for a kill after checkpoint-2
        return vowel_share(prompts, responses)

    with pytest.raises(KeyboardInterrupt):
        rl.run(cfg, run_dir, reward_fn=crash_on_third_step)
    out = run_dir.path / "rl"
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model").exists()
    summary = rl.run(cfg, run_dir, reward_fn=vowel_share)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (out / "checkpoints").exists() and (out / "model" / "config.json").is_file()


def test_lora_policy_is_merged_saved_and_evaluated_against_sl_cai(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = RunDir(tmp_path / "run")
    run_dir.manifest["config"] = {"label": {"fewshot": 1, "batch_size": 4}}  # the label stage's settings, as a run records them
    cfg = _cfg(tiny_model_dir, lora=True, lora_r=4, lora_alpha=8, max_steps=2, eval_prompts=2, feedback_model=str(tiny_model_dir))
    summary = rl.run(cfg, run_dir, reward_fn=vowel_share)
    out = run_dir.path / "rl"
    assert not (out / "model" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in model.named_parameters())
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["by_set"]) == {"redteam", "helpful"} and ev["all"]["prompts"] == 4 and ev["by_set"]["redteam"]["prompts"] == 2
    a = ev["all"]
    assert a["wins"] + a["ties"] + a["losses"] == 4
    assert a["pm_score_difference_ci95"][0] <= a["pm_score_difference"] <= a["pm_score_difference_ci95"][1]
    assert 0 <= a["win_rate_ci95"][0] <= a["win_rate_rl_cai"] <= a["win_rate_ci95"][1] <= 1
    assert math.isfinite(a["kl_rl_to_sl_nats_per_response"]) and ev["feedback_model"] == str(tiny_model_dir)
    samples = read_jsonl(out / "eval_samples.jsonl")
    assert len(samples) == 4 and all(s["score_rl"] == pytest.approx(vowel_share(None, [s["rl_cai"]])[0]) for s in samples)
    assert summary["eval"]["prompts"] == 4
    card = (out / "model" / "README.md").read_text()
    assert "RL-CAI" in card and "win rate" in card and "LoRA adapter merged" in card
    # a rerun after a crash in the evaluation does not train again
    (out / "eval.json").unlink()
    weights = (out / "model" / "model.safetensors").stat().st_mtime_ns
    again = rl.run(cfg, run_dir, reward_fn=vowel_share)
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == weights and (out / "eval.json").is_file()
    assert again["steps"] == 2 and again["eval"]["prompts"] == 4


def test_evaluation_on_the_models_in_memory_equals_one_on_the_saved_ones(tiny_model_dir, tmp_path):
    """Full fine-tuning: the evaluation right after training uses the trained policy and the
    reference as they are in memory, without the bf16 autocast training wrapped around them; a
    rerun (evaluation only) loads both from disk in float32: same results."""
    from constitutional.training import training_dtype

    if training_dtype("auto") != "bfloat16":
        pytest.skip("needs a CPU with bf16: accelerate wraps the forward only under mixed precision")
    run_dir = RunDir(tmp_path / "run")
    run_dir.manifest["config"] = {"label": {"fewshot": 1, "batch_size": 4}}
    cfg = _cfg(tiny_model_dir, max_steps=2, eval_prompts=2, feedback_model=str(tiny_model_dir), dtype="bfloat16")
    rl.run(cfg, run_dir, reward_fn=vowel_share)
    out = run_dir.path / "rl"
    in_memory = read_jsonl(out / "eval_samples.jsonl")
    (out / "eval.json").unlink()
    rl.run(cfg, run_dir, reward_fn=vowel_share)
    from_disk = read_jsonl(out / "eval_samples.jsonl")
    assert [s["rl_cai"] for s in in_memory] == [s["rl_cai"] for s in from_disk] and len({s["rl_cai"] for s in in_memory}) > 1
    assert [s["sl_cai"] for s in in_memory] == [s["sl_cai"] for s in from_disk]
    assert [s["kl"] for s in in_memory] == pytest.approx([s["kl"] for s in from_disk], abs=1e-5)
    assert [s["p_rl"] for s in in_memory] == pytest.approx([s["p_rl"] for s in from_disk], abs=1e-5)


def test_default_reward_is_the_preference_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pm_dir = tmp_path / "pm" / "model"
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    pm.config.pad_token_id = 2
    pm.save_pretrained(pm_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(pm_dir)
    run_dir = RunDir(tmp_path / "run")
    summary = rl.run(_cfg(tiny_model_dir, max_steps=2, reward_model=str(pm_dir)), run_dir)
    assert summary["reward_model"] == str(pm_dir) and summary["steps"] == 2
    assert all(math.isfinite(r["rl/score"]) for r in read_jsonl(run_dir.path / "rl" / "metrics.jsonl"))


def test_training_prompts_mix_redteam_and_helpful(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    rows, counts = rl.training_prompts(rl.Config(limit=6, helpful_ratio=0.5), run_dir)
    assert counts == {"redteam": 6, "helpful": 3} and [r["source"] for r in rows] == ["redteam"] * 6 + ["helpful"] * 3
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    assert rl.training_prompts(rl.Config(limit=6, helpful_ratio=0.5), run_dir)[0] == rows  # the seeded draw repeats
    assert rl.training_prompts(rl.Config(limit=6, helpful_prompts=""), run_dir)[1] == {"redteam": 6, "helpful": 0}
    held = rl.eval_sets(rl.Config(eval_prompts=2), run_dir)
    assert [name for name, _ in held] == ["redteam"] * 2 + ["helpful"] * 2 and all(p.split == "test" for _, p in held)


@pytest.mark.parametrize("settings, message", [
    ({}, "run `cai train-pm` first or set rl.reward_model"),
    ({"algorithm": "ppo"}, "use rloo or grpo"),
    ({"num_generations": 1}, "need >= 2 samples"),
    ({"max_kl": 0.1, "beta": 0.0}, "needs rl.beta > 0"),
    ({"prompts": "missing.jsonl"}, "prompt file not found"),
    ({"dtype": "int8"}, "rl.dtype"),
])
def test_bad_input_is_a_one_line_user_error(tmp_path, settings, message):
    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(UserError) as e:
        rl.run(rl.Config(limit=2, **settings), run_dir)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (run_dir.path / "rl" / "model").exists()

