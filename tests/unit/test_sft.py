"""`cai sft` on the tiny random Llama: the dataset mix, completion-only loss against a hand-computed
cross-entropy, end-to-end runs (full and LoRA), resume after a crash, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from constitutional.errors import UserError
from constitutional.run import RunDir
from constitutional.stages import sft


def write_revise(run: RunDir, records: int = 6, unusable: int = 2, helpful: int = 4) -> None:
    """Fabricate `revise/revisions.jsonl` (the first `unusable` records unusable; every usable one has
    two accepted rounds and one dropped round) and `revise/helpful.jsonl` (2 answers per prompt)."""
    d = run.path / "revise"
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(records):
        usable = i >= unusable
        rounds = []
        for k, status in enumerate(["ok", "dropped:empty", "ok"]):
            ok = usable and status == "ok"
            rounds.append({
                "principle_id": f"harm-{k}", "critique_request": "Identify harmful content.", "critique": "It is harmful.",
                "revision_request": "Please rewrite it.", "revision": f"Revision {k} of answer {i}: I can't help with that." if ok else "",
                "status": "ok" if ok else "dropped:empty", "retries": 0,
            })
        prompt = f"How do I pick lock number {i}?"
        lines.append({
            "id": f"rt{i}", "prompt": prompt, "messages": [{"role": "user", "content": prompt}], "category": "crime",
            "split": "train", "initial_response": "Sure, here is how.", "rounds": rounds,
            "final_response": rounds[2]["revision"] if usable else "Sure, here is how.", "usable": usable,
        })
    (d / "revisions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    hl = [{"id": f"h{i}", "prompt": f"How do I bake bread {i}?", "messages": [{"role": "user", "content": f"How do I bake bread {i}?"}],
           "category": None, "responses": [f"Mix flour and water ({i}, a).", f"Knead and bake ({i}, b)."]} for i in range(helpful)]
    (d / "helpful.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hl))


def config(model_dir, **kw) -> sft.Config:
    base = dict(model=str(model_dir), dtype="float32", batch_size=2, max_steps=2, learning_rate=1e-3, max_length=128, save_steps=100)
    return sft.Config(**{**base, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


def test_dataset_mix(tmp_path):
    run = RunDir(tmp_path / "run")
    write_revise(run)
    rows, info = sft.build_dataset(config("unused"), run)
    rev = [r for r in rows if r["source"] == "revision"]
    helpful = [r for r in rows if r["source"] == "helpful"]
    assert [r["id"] for r in rev] == ["rt2", "rt3", "rt4", "rt5"]  # unusable rt0, rt1 left out
    assert rev[0]["completion"] == [{"role": "assistant", "content": "Revision 2 of answer 2: I can't help with that."}]
    assert rev[0]["prompt"] == [{"role": "user", "content": "How do I pick lock number 2?"}]
    # ratio 1: 4 helpful examples, one answer from each of 4 prompts before any second answer
    assert len(helpful) == 4 and {r["id"].split("/")[0] for r in helpful} == {"h0", "h1", "h2", "h3"}
    assert info["principles"] == {"harm-0": 4, "harm-2": 4} and info["usable"] == 4

    rows, _ = sft.build_dataset(config("unused", all_revisions=True, helpful_ratio=0.75), run)
    rev = [r for r in rows if r["source"] == "revision"]
    assert len(rev) == 8 and {r["id"] for r in rev if r["id"].startswith("rt2/")} == {"rt2/r0", "rt2/r2"}
    assert sum(r["source"] == "helpful" for r in rows) == 6  # 0.75 * 8: all 4 first answers, then 2 second ones
    rows, _ = sft.build_dataset(config("unused", helpful_ratio=5.0), run)
    assert sum(r["source"] == "helpful" for r in rows) == 8  # fewer than asked: all that are available
    rows, _ = sft.build_dataset(config("unused", helpful="none"), run)
    assert {r["source"] for r in rows} == {"revision"}


def test_completion_only_loss(tmp_path, tiny_model_dir):
    """Labels ignore exactly the prompt tokens; the trainer's loss equals a hand-computed
    cross-entropy over the completion tokens of a plain forward pass."""
    run = RunDir(tmp_path / "run")
    write_revise(run)
    cfg = config(tiny_model_dir, batch_size=4, padding_free=False)
    rows, _ = sft.build_dataset(cfg, run)
    trainer = sft.build_trainer(cfg, rows, tmp_path / "ckpt")
    tok = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 4
    rendered = {tok.apply_chat_template(r["prompt"] + r["completion"], tokenize=False): r for r in rows}
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        row = rendered[tok.decode(ids[i, :n])]  # which example this batch row is
        prompt_ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        p = len(prompt_ids)
        assert ids[i, :p].tolist() == prompt_ids
        assert (labels[i, :p] == -100).all(), "a prompt token is trained on"
        assert labels[i, p:n].tolist() == ids[i, p:n].tolist(), "a completion token is ignored"
        assert (labels[i, n:] == -100).all(), "padding is trained on"
        assert tok.convert_tokens_to_ids("<|im_end|>") in labels[i, p:n].tolist()  # learns to end its turn

    model = trainer.model
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        by_hand = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        trl_loss = trainer.compute_loss(model, dict(batch))
    assert abs(trl_loss.item() - by_hand.item()) < 1e-4
    with torch.no_grad():  # and it is not the loss over every token
        everything = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), torch.where(mask.bool(), ids, -100)[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(everything.item() - by_hand.item()) > 1e-3


def test_padding_free_batches_train_like_padded_ones(tmp_path, tiny_model_dir):
    """A padding-free batch (one row, position ids restarting at each example) gives the padded
    batch's loss and gradients, under sdpa and eager attention; with positions that do not restart
    the examples would attend to each other and the loss would differ."""
    import dataclasses

    run = RunDir(tmp_path / "run")
    write_revise(run)
    cfg = config(tiny_model_dir, batch_size=4)
    rows, _ = sft.build_dataset(cfg, run)
    trainer = sft.build_trainer(cfg, rows, tmp_path / "ckpt")
    assert trainer.speed_facts["padding_free"] and trainer.speed_facts["gradient_checkpointing"] is False
    examples = [trainer.train_dataset[i] for i in (0, 1, 4, 5)]  # two revisions, two helpful answers
    free = trainer.data_collator(examples)
    padded = dataclasses.replace(trainer.data_collator, padding_free=False)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert "attention_mask" not in free and free["input_ids"].shape == (1, sum(lengths))
    assert padded["input_ids"].shape == (4, max(lengths)) and len(set(lengths)) > 1  # the padded batch has padding
    model = trainer.model

    def loss_and_grad(batch):
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        (l_pad, g_pad), (l_free, g_free) = loss_and_grad(padded), loss_and_grad(free)
        assert l_free == pytest.approx(l_pad, abs=1e-5), impl
        assert torch.allclose(g_free, g_pad, atol=1e-5), impl
        leaky = {k: v for k, v in free.items() if not k.startswith(("cu_seq", "max_length", "seq_idx"))}
        leaky["position_ids"] = torch.arange(sum(lengths))[None]
        assert abs(loss_and_grad(leaky)[0] - l_pad) > 1e-4, impl


@pytest.mark.parametrize("padding_free", [True, False])
def test_micro_batches_accumulate_the_batch_gradient(tmp_path, tiny_model_dir, monkeypatch, padding_free):
    """A batch of 4 in 2 micro-batches of 2: the same examples, the same first-step gradient."""
    from conftest import first_step_gradient
    from constitutional.training import StepPlan

    run = RunDir(tmp_path / "run")
    write_revise(run)
    rows, _ = sft.build_dataset(config(tiny_model_dir), run)
    grads = {}
    for m in (1, 2):
        monkeypatch.setattr(sft, "plan_step", lambda *a, m=m, **k: StepPlan(m, False, {"micro_batches": m}))
        trainer = sft.build_trainer(config(tiny_model_dir, batch_size=4, max_steps=1, padding_free=padding_free), rows, tmp_path / f"ckpt{m}")
        assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4 // m, m)
        grads[m] = first_step_gradient(trainer)
    assert torch.allclose(grads[1], grads[2], atol=1e-6) and grads[1].abs().max() > 1e-3


def test_end_to_end(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    run = RunDir(tmp_path / "run")
    write_revise(run)
    summary = sft.run(config(tiny_model_dir, max_steps=3), run)
    out = run.path / "sft"
    assert summary["steps"] == 3 and summary["examples"] == 8
    assert summary["revision_examples"] == 4 and summary["helpful_examples"] == 4 and summary["resumed_from_step"] == 0
    assert summary["final_loss"] is not None and summary["dtype"] == "float32" and summary["model"] == str(out / "model")

    rows = read_jsonl(out / "dataset.jsonl")
    assert [r["source"] for r in rows].count("helpful") == 4 and not any(r["id"] in ("rt0", "rt1") for r in rows)
    assert set(rows[0]) == {"id", "source", "prompt", "completion"}
    assert [c["step"] for c in json.loads((out / "loss.json").read_text())] == [1, 2, 3]

    model_dir = out / "model"
    assert (model_dir / "model.safetensors").is_file() and not (out / "checkpoints").exists()
    assert AutoTokenizer.from_pretrained(str(model_dir)).chat_template
    card = (model_dir / "README.md").read_text()
    assert "harm-0" in card and "harm-2" in card and "4 usable" in card and "total: 8 examples" in card
    base, tuned = weights(tiny_model_dir), weights(model_dir)
    assert base.keys() == tuned.keys()
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_lora_is_merged(tmp_path, tiny_model_dir):
    run = RunDir(tmp_path / "run")
    write_revise(run)
    # the CPU-friendly combination: LoRA, bf16 autocast, gradient checkpointing; length in epochs
    cfg = config(tiny_model_dir, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2, gradient_checkpointing=True,
                 dtype="bfloat16", max_steps=0, epochs=0.5)
    summary = sft.run(cfg, run)
    model_dir = run.path / "sft" / "model"
    assert summary["lora"] and summary["dtype"] == "bfloat16"
    assert summary["steps"] == 2  # half of 8 examples / batch 2
    assert not (model_dir / "adapter_config.json").exists()
    base, tuned = weights(tiny_model_dir), weights(model_dir)
    assert base.keys() == tuned.keys()  # a plain model: no lora_A / lora_B tensors
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all("proj" in k for k in changed)  # only the adapted linear layers moved


def test_resume_after_crash(tmp_path, tiny_model_dir, monkeypatch):
    import trl
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 1:
                raise RuntimeError("simulated crash")

    class CrashingTrainer(trl.SFTTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, callbacks=[Crash()], **kw)

    run = RunDir(tmp_path / "run")
    write_revise(run)
    cfg = config(tiny_model_dir, max_steps=3, save_steps=1)
    with monkeypatch.context() as m:
        m.setattr(trl, "SFTTrainer", CrashingTrainer)
        with pytest.raises(RuntimeError, match="simulated crash"):
            sft.run(cfg, run)
    out = run.path / "sft"
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    assert not (out / "model").exists()

    summary = sft.run(cfg, run)
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 3
    assert [c["step"] for c in json.loads((out / "loss.json").read_text())] == [1, 2, 3]
    assert (out / "model" / "config.json").is_file() and not (out / "checkpoints").exists()


def test_bad_input(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match=r"revisions.jsonl: revisions file not found; run `cai revise` first"):
        sft.run(config("unused"), run)
    write_revise(run, records=3, unusable=3)
    with pytest.raises(UserError, match=r"no usable revisions \(3 records, 0 usable\)"):
        sft.run(config("unused"), run)
    path = run.path / "revise" / "revisions.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(UserError, match=r"revisions.jsonl:2: malformed JSON"):
        sft.run(config("unused"), run)
    write_revise(run)
    with pytest.raises(UserError, match=r"nowhere.jsonl: helpful samples file not found"):
        sft.run(config("unused", helpful=str(tmp_path / "nowhere.jsonl")), run)
    with pytest.raises(UserError, match=r"sft.batch_size 0"):
        sft.run(config("unused", batch_size=0), run)
    with pytest.raises(UserError, match=r"sft.model '/nowhere/model': directory not found"):
        sft.run(config("/nowhere/model"), run)
    assert not (run.path / "sft" / "model").exists()


def test_no_checkpoint_at_the_last_step(tmp_path, tiny_model_dir, monkeypatch):
    """Checkpoints every save_steps, but none at the last step: the stage saves the model right
    after training, and that checkpoint (weights and AdamW's moments) would be deleted unread."""
    import trl
    from transformers import TrainerCallback

    saved = []

    class Record(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            saved.append(state.global_step)

    class RecordingTrainer(trl.SFTTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, callbacks=[Record()], **kw)

    run = RunDir(tmp_path / "run")
    write_revise(run)
    monkeypatch.setattr(trl, "SFTTrainer", RecordingTrainer)
    summary = sft.run(config(tiny_model_dir, max_steps=3, save_steps=1), run)
    assert saved == [1, 2] and summary["steps"] == 3
    assert (run.path / "sft" / "model" / "config.json").is_file()
