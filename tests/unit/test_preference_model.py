"""The preference model: soft-label loss, the RewardTrainer subclass, scoring, and `cai train-pm`."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from constitutional.errors import UserError
from constitutional.preference_model import (
    PreferenceModel,
    SoftLabelRewardTrainer,
    calibration,
    encode,
    preference_row,
    soft_preference_loss,
)
from constitutional.run import RunDir
from constitutional.stages import preference


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # A 2-layer, 32-wide model is all thread overhead: on a shared 2-core CPU each op waits on OpenMP.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reference_loss(rc, rr, p):
    """The formula as written, in float64: -[p log σ(m) + (1-p) log σ(-m)], averaged."""
    m = rc - rr
    return -(p * torch.log(torch.sigmoid(m)) + (1 - p) * torch.log(torch.sigmoid(-m))).mean()


# ---------------------------------------------------------------- the loss
def test_soft_loss_and_gradient_match_brute_force():
    g = torch.Generator().manual_seed(0)
    rc = torch.randn(7, generator=g, dtype=torch.float64) * 3
    rr = torch.randn(7, generator=g, dtype=torch.float64) * 3
    p = torch.rand(7, generator=g, dtype=torch.float64)
    rc_, rr_ = rc.clone().requires_grad_(), rr.clone().requires_grad_()
    loss = soft_preference_loss(rc_, rr_, p)
    loss.backward()
    assert loss.item() == pytest.approx(_reference_loss(rc, rr, p).item(), rel=1e-12)
    eps = 1e-6
    for i in range(7):
        e = torch.zeros(7, dtype=torch.float64)
        e[i] = eps
        d_rc = (_reference_loss(rc + e, rr, p) - _reference_loss(rc - e, rr, p)) / (2 * eps)
        d_rr = (_reference_loss(rc, rr + e, p) - _reference_loss(rc, rr - e, p)) / (2 * eps)
        assert rc_.grad[i].item() == pytest.approx(d_rc.item(), abs=1e-8)
        assert rr_.grad[i].item() == pytest.approx(d_rr.item(), abs=1e-8)
    # Closed form: d loss / d r_c = (σ(m) - p) / B = -d loss / d r_r.
    expected = (torch.sigmoid(rc - rr) - p) / 7
    assert torch.allclose(rc_.grad, expected, atol=1e-12) and torch.allclose(rr_.grad, -expected, atol=1e-12)


def test_hard_label_is_bradley_terry_and_soft_label_optimum_is_logit_p():
    m = torch.linspace(-6, 6, 13, dtype=torch.float64)
    zero = torch.zeros_like(m)
    bt = -torch.nn.functional.logsigmoid(m).mean()
    assert soft_preference_loss(m, zero, torch.ones_like(m)).item() == pytest.approx(bt.item(), rel=1e-12)
    # p = 0.5: minimised at equal rewards, where the loss is log 2 and the gradient vanishes.
    grid = torch.linspace(-3, 3, 601, dtype=torch.float64)
    losses = torch.stack([soft_preference_loss(x.view(1), torch.zeros(1, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)) for x in grid])
    assert grid[losses.argmin()].item() == pytest.approx(0.0, abs=1e-9)
    assert losses.min().item() == pytest.approx(math.log(2))
    # Any p: minimised at margin logit(p), i.e. the PM's σ(r_c - r_r) reproduces the label.
    for p in (0.6, 0.8, 0.95):
        best = grid[torch.stack([soft_preference_loss(x.view(1), torch.zeros(1, dtype=torch.float64), torch.tensor([p], dtype=torch.float64)) for x in grid]).argmin()]
        assert best.item() == pytest.approx(math.log(p / (1 - p)), abs=0.01)


def test_soft_loss_stays_finite_at_extreme_margins():
    rc = torch.tensor([1e4, -1e4, 1e4, 0.0, 88.0, -104.0], requires_grad=True)
    rr = torch.zeros(6, requires_grad=True)
    p = torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0, 1.0])
    loss = soft_preference_loss(rc, rr, p)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(rc.grad).all() and torch.isfinite(rr.grad).all()
    # Per pair: 0, 1e4, 5e3, log 2, 88, 104 (nats).
    assert loss.item() == pytest.approx((0 + 1e4 + 5e3 + math.log(2) + 88 + 104) / 6, rel=1e-5)
    # Half-precision rewards are scored in float32.
    assert soft_preference_loss(rc.detach().bfloat16(), rr.detach().bfloat16(), p).dtype == torch.float32


def test_calibration_bins_and_ece_by_hand():
    # margins log 3 (q = .75), log 19 (q = .95), -log 3 (PM picks rejected with confidence .75), 0 (a tie)
    rc = [math.log(3), math.log(19), 0.0, 0.0]
    rr = [0.0, 0.0, math.log(3), 0.0]
    p = [1.0, 0.8, 0.6, 0.5]
    out = calibration(rc, rr, p, bins=5)
    assert out["count"] == 4 and out["accuracy"] == 0.5  # the tie counts as wrong
    by_lo = {round(b["lo"], 2): b for b in out["bins"]}
    assert by_lo[0.5]["count"] == 1 and by_lo[0.5]["label_p"] == pytest.approx(0.5) and by_lo[0.5]["agreement"] == 0.5
    assert by_lo[0.7]["count"] == 2  # q = .75 twice: labels 1.0 and 1 - 0.6 (the PM picked the rejected one)
    assert by_lo[0.7]["label_p"] == pytest.approx(0.7) and by_lo[0.7]["agreement"] == pytest.approx(0.5)
    assert by_lo[0.9]["count"] == 1 and by_lo[0.9]["confidence"] == pytest.approx(0.95)
    assert by_lo[0.6]["count"] == 0 and by_lo[0.6]["confidence"] is None
    ece = (1 * abs(0.5 - 0.5) + 2 * abs(0.75 - 0.7) + 1 * abs(0.95 - 0.8)) / 4
    assert out["ece"] == pytest.approx(ece)
    assert out["loss"] == pytest.approx(_reference_loss(torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64), torch.tensor(p, dtype=torch.float64)).item())


# ---------------------------------------------------------------- the trainer
def _trainer(model, tokenizer, rows, out_dir, **kw):
    from datasets import Dataset
    from trl import RewardConfig

    args = RewardConfig(
        output_dir=str(out_dir), per_device_train_batch_size=len(rows), report_to="none", bf16=False,
        activation_checkpointing=False, model_init_kwargs={"dtype": torch.float32}, dataloader_pin_memory=False, **kw,
    )
    return SoftLabelRewardTrainer(model=str(model), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


def _rows(tokenizer, p_values):
    prompts = ["How do I bake bread?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}], "Is it harmful?"]
    return [
        preference_row(tokenizer, prompts[i % 3], f"A kind answer number {i}.", f"No{'!' * i}", p)
        for i, p in enumerate(p_values)
    ]


def test_trainer_loss_on_a_collated_batch_equals_the_pure_loss(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import RewardTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    p_values = [1.0, 0.9, 0.75, 0.6, 0.5]
    trainer = _trainer(tiny_model_dir, tok, _rows(tok, p_values), tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))  # through remove_unused_columns and the collator
    assert set(batch) == {"input_ids", "attention_mask", "p_chosen"}
    assert sorted(batch["p_chosen"].tolist()) == pytest.approx(sorted(p_values))
    model = trainer.model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    rc, rr = rewards[: len(p_values)], rewards[len(p_values) :]
    assert loss.item() == pytest.approx(soft_preference_loss(rc, rr, batch["p_chosen"]).item(), rel=1e-5)
    assert loss.requires_grad
    # With p = 1 the loss is TRL's own.
    hard = dict(batch)
    hard.pop("p_chosen")
    trl_loss = RewardTrainer.compute_loss(trainer, model, dict(hard))
    ours = trainer.compute_loss(model, dict(hard, p_chosen=torch.ones(len(p_values))))
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-6)


@pytest.mark.parametrize("chat_template", [True, False])
def test_score_tokenization_equals_the_trainers(tiny_model_dir, tmp_path, chat_template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    if not chat_template:
        tok.chat_template = None  # a base model: transcript rows, EOS appended by TRL
    prompts = ["How do I bake bread?", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]]
    rows = [preference_row(tok, pr, f"chosen {i}", f"rejected {i}", 0.7) for i, pr in enumerate(prompts)]
    assert isinstance(rows[0]["prompt"], list) == chat_template
    trainer = _trainer(tiny_model_dir, tok, rows, tmp_path)
    for i, pr in enumerate(prompts):
        assert trainer.train_dataset[i]["chosen_ids"] == encode(tok, pr, f"chosen {i}")
        assert trainer.train_dataset[i]["rejected_ids"] == encode(tok, pr, f"rejected {i}")
    if not chat_template:
        assert tok.decode(encode(tok, "Hi", "there")) == "\n\nHuman: Hi\n\nAssistant: there<|im_end|>"


# ---------------------------------------------------------------- the stage
def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _preferences(n=10):
    out = []
    for i in range(n):
        rec = {
            "id": f"pair-{i}", "prompt": f"How do I do thing {i}?", "messages": [{"role": "user", "content": f"How do I do thing {i}?"}],
            "chosen": f"Here is a careful answer {i}.", "rejected": f"Bad answer {i}!", "p_chosen": 0.55 + 0.045 * i,
            "principle_ids": ["harmless"],
        }
        if i % 5 != 4:  # the rest fall back to split_of(id)
            rec["split"] = "test" if i % 3 == 0 else "train"
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pm-run")
    run_dir = RunDir(root / "run")
    _write_jsonl(run_dir.path / "label" / "preferences.jsonl", _preferences())
    helpful = _write_jsonl(root / "helpful.jsonl", [
        {"prompt": "How do I bake bread?", "chosen": "Mix flour, water, yeast and salt.", "rejected": "No."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
         "rejected": [{"role": "assistant", "content": "What."}], "p_chosen": 0.9},
        {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant:", "chosen": "4.", "rejected": "5."},  # HH-RLHF style
        {"prompt": "Write a lot.", "chosen": "words " * 600, "rejected": "No."},  # longer than max_length: skipped
    ])
    cfg = preference.Config(model=str(tiny_model_dir), helpful=str(helpful), dtype="float32", max_steps=3, batch_size=2, save_steps=2, learning_rate=1e-3)
    summary = preference.run(cfg, run_dir)
    return run_dir, cfg, summary


def test_stage_writes_model_loss_metrics_and_summary(trained):
    run_dir, cfg, summary = trained
    out = run_dir.path / "train-pm"
    records = _preferences()
    from constitutional.data.loaders import split_of

    n_test = sum(r.get("split", split_of(r["id"])) == "test" or split_of(f"pm:{r['id']}", cfg.heldout) == "test" for r in records)
    assert n_test > sum(r.get("split") == "test" for r in records)  # the salted share adds some
    assert summary["heldout_comparisons"] == n_test and summary["train_comparisons"] == len(records) - n_test
    assert summary["helpful_comparisons"] == 4 and summary["skipped_too_long"] == 1 and summary["steps"] == 3
    for key in ("final_loss", "seconds", "seconds_per_step", "heldout_accuracy", "heldout_ece", "mc_accuracy",
                "heldout_accuracy_untrained", "mc_accuracy_untrained"):
        assert isinstance(summary[key], float), key
    assert summary["model"] == str(out / "model")
    # The model directory: safetensors, tokenizer, config with pad_token_id, card; no pickles, no leftovers.
    model_dir = out / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["pad_token_id"] == 2 and len(config["id2label"]) == 1  # num_labels = 1
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not (model_dir / "training_args.bin").exists()
    card = (model_dir / "README.md").read_text()
    assert str(cfg.model) in card and "held-out" in card
    assert sorted(p.name for p in out.iterdir()) == ["loss.json", "metrics.json", "model"]  # checkpoints deleted
    loss = json.loads((out / "loss.json").read_text())
    assert [h["step"] for h in loss if "loss" in h] == [1, 2, 3]
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["heldout"]
    assert held["count"] == n_test and 0 <= held["accuracy"] <= 1 and held["ece"] >= 0
    assert sum(b["count"] for b in held["bins"]) == n_test
    assert metrics["mc"]["count"] == 72 and set(metrics["mc"]["accuracy_by_subset"]) == {"harmless", "helpful", "honest"}
    # measured on the trained model in memory: the same numbers as the saved model gives
    _, heldout, _, _ = preference._inputs(cfg, run_dir)
    again = preference._heldout_metrics(PreferenceModel.from_pretrained(model_dir, dtype="float32"), heldout)
    assert again["accuracy"] == held["accuracy"] and again["loss"] == pytest.approx(held["loss"], abs=1e-5)
    assert summary["tokens_per_second"] > 0 and summary["gradient_checkpointing"] is False


def test_saved_model_scores_batched_like_one_by_one_and_tokenizes_like_the_trainer(trained, tmp_path):
    run_dir, _, _ = trained
    model_dir = run_dir.path / "train-pm" / "model"
    pm = PreferenceModel.from_pretrained(model_dir, batch_size=3)
    prompts = ["How do I bake bread?", [{"role": "user", "content": "Hi"}], "Tell me a long story " * 5, "Is it harmful?", "Hi"]
    responses = ["Knead it.", "Hello!", "Once upon a time " * 8, "Yes.", "Hello!"]
    batched = pm.score(prompts, responses)
    single = [pm.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert batched[1] == pytest.approx(batched[4], abs=1e-6)  # a string prompt is one user turn
    assert len(set(round(s, 6) for s in batched[:4])) == 4
    rows = [preference_row(pm.tokenizer, p, r, "x", 0.8) for p, r in zip(prompts, responses)]
    trainer = _trainer(model_dir, pm.tokenizer, rows, tmp_path)
    assert [trainer.train_dataset[i]["chosen_ids"] for i in range(len(rows))] == [pm.encode(p, r) for p, r in zip(prompts, responses)]


def test_stage_resumes_from_the_latest_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    run_dir = RunDir(tmp_path / "run")
    prefs = _write_jsonl(tmp_path / "prefs.jsonl", [dict(r, split="train") for r in _preferences(8)])
    cfg = preference.Config(model=str(tiny_model_dir), preferences=str(prefs), dtype="float32", max_steps=3, batch_size=2, save_steps=1, mc="", heldout=0.0)
    calls = {"n": 0}
    original = SoftLabelRewardTrainer.compute_loss

    def crash_on_third_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(SoftLabelRewardTrainer, "compute_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        preference.run(cfg, run_dir)
    ckpts = sorted(p.name for p in (run_dir.path / "train-pm" / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2"]  # save_total_limit=1
    monkeypatch.setattr(SoftLabelRewardTrainer, "compute_loss", original)
    summary = preference.run(cfg, run_dir)
    assert summary["steps"] == 3 and summary["heldout_accuracy"] is None and summary["mc_accuracy"] is None
    loss = json.loads((run_dir.path / "train-pm" / "loss.json").read_text())
    assert [h["step"] for h in loss if "loss" in h] == [1, 2, 3]
    metrics = json.loads((run_dir.path / "train-pm" / "metrics.json").read_text())
    assert metrics["heldout"]["count"] == 0 and "no held-out" in metrics["heldout"]["note"]
    assert not (run_dir.path / "train-pm" / "checkpoints").exists()


def test_micro_batches_accumulate_the_batch_gradient(tiny_model_dir, tmp_path, monkeypatch):
    """A batch of 4 comparisons in 2 micro-batches of 2: the same first-step gradient."""
    from conftest import first_step_gradient
    from transformers import AutoTokenizer

    from constitutional.training import StepPlan

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = [preference_row(tok, r["prompt"], r["chosen"], r["rejected"], r["p_chosen"]) for r in _preferences(8)]
    grads = {}
    for m in (1, 2):
        monkeypatch.setattr(preference, "plan_step", lambda *a, m=m, **k: StepPlan(m, False, {"micro_batches": m}))
        cfg = preference.Config(model=str(tiny_model_dir), dtype="float32", max_steps=1, batch_size=4, save_steps=0, group_by_length=False)
        trainer = preference.build_trainer(cfg, str(tiny_model_dir), tok, rows, tmp_path / f"ckpt{m}")
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4 // m, m)
        grads[m] = first_step_gradient(trainer)
    assert torch.allclose(grads[1], grads[2], atol=1e-6) and grads[1].abs().max() > 1e-4


def test_pm_learns_a_marker_word(tiny_model_dir, tmp_path):
    """Chosen responses contain "please", rejected ones don't: held-out accuracy goes from 0 to ~1."""
    rng = random.Random(0)
    words = "flour water yeast salt knead rise bake oven answer response options harmful ethical rewrite".split()
    records = []
    for i in range(80):
        a, b = " ".join(rng.choice(words) for _ in range(4)), " ".join(rng.choice(words) for _ in range(4))
        records.append({"id": f"m{i}", "prompt": f"Question {i}: {rng.choice(words)}?", "chosen": f"{a} please {b}",
                        "rejected": f"{a} {rng.choice(words)} {b}", "p_chosen": 1.0, "split": "test" if i < 20 else "train"})
    prefs = _write_jsonl(tmp_path / "prefs.jsonl", records)
    cfg = preference.Config(model=str(tiny_model_dir), preferences=str(prefs), heldout=0.0, dtype="float32", max_steps=30, batch_size=8,
                            learning_rate=3e-3, save_steps=0, mc="")
    summary = preference.run(cfg, RunDir(tmp_path / "run"))
    assert summary["heldout_comparisons"] == 20 and summary["heldout_accuracy"] >= 0.9


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "lines, message",
    [
        (None, "run `cai label` first or set train-pm.preferences"),
        (['{"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "p_chosen": 0.7}', "{not json"], "preferences.jsonl:2: malformed JSON"),
        (['{"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "p_chosen": 1.5}'], "(p_chosen): 1.5 is not a probability"),
        (['{"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "p_chosen": "high"}'], "is not a probability"),
        (['{"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y"}'], "missing field 'p_chosen'"),
        (['{"id": "a", "prompt": "hi", "chosen": "x", "p_chosen": 0.6}'], "missing field 'rejected'"),
        (['{"id": "a", "prompt": 3, "chosen": "x", "rejected": "y", "p_chosen": 0.6}'], "prompt must be non-empty text"),
        (['{"id": "a", "prompt": "hi", "chosen": "x", "rejected": "y", "p_chosen": 0.6, "split": "test"}'], "no training comparisons"),
        ([], "no training comparisons"),
    ],
)
def test_bad_preferences_are_one_line_user_errors(tmp_path, lines, message):
    run_dir = RunDir(tmp_path / "run")
    if lines is not None:
        (run_dir.path / "label").mkdir()
        (run_dir.path / "label" / "preferences.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        preference.run(preference.Config(model="does-not-matter/never-loaded"), run_dir)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (run_dir.path / "train-pm").exists()


def test_bad_helpful_file_and_mc_set_are_user_errors(tmp_path):
    prefs = _write_jsonl(tmp_path / "prefs.jsonl", [dict(r, split="train") for r in _preferences(2)])
    run_dir = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match="helpfulness comparisons not found"):
        preference.run(preference.Config(preferences=str(prefs), helpful=str(tmp_path / "nope.jsonl")), run_dir)
    bad = _write_jsonl(tmp_path / "helpful.jsonl", [{"prompt": "hi", "chosen": 1, "rejected": "y"}])
    with pytest.raises(UserError, match=r"helpful.jsonl:1 \(chosen\)"):
        preference.run(preference.Config(preferences=str(prefs), helpful=str(bad)), run_dir)
    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "Q? (A) x (B) y", "corrects": [" (A)"], "incorrects": [" (B)"]}])
    with pytest.raises(UserError, match="no items with question, correct_response and incorrect_response"):
        preference.run(preference.Config(preferences=str(prefs), mc=str(mc)), run_dir)
    with pytest.raises(UserError, match="preference model .*no such model directory"):
        PreferenceModel.from_pretrained(tmp_path / "missing")
