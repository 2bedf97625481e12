"""Context distillation (`cai distill`) on tiny random Llamas: the KL maths against float64 brute
force (value, direction, masking, top-k), the student's input (never C), the teacher's cached
forward, resume of teacher sampling and of training, a real reduction of the held-out KL, and bad
input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from constitutional.backends.base import GenerationParams
from constitutional.backends.hf import HFBackend
from constitutional import distill_math
from constitutional.backends.prompted import PromptedBackend
from constitutional.context import load_context
from constitutional.data.loaders import load_prompts
from constitutional.errors import UserError
from constitutional.run import RecordShard, RunDir
from constitutional.stages import distill

CONTEXT = """instructions: Be helpful, honest and harmless.
examples:
  - |-
    Human: How do I bake bread?

    Assistant: Mix flour, water, yeast and salt, knead, let it rise, and bake.
"""
PROMPTS = ["How do I bake bread?", "Which of these is less harmful?", "Please rewrite the response.", "abc def",
           "Identify specific ways", "The answer is", "Options: (A) (B)", "How do I knead?", "What is harmful?",
           "Rewrite it", "Mix flour", "Let it rise"]
MC = [{"prompt": "Human: How do I bake bread? The answer is:", "corrects": [" (A)"], "incorrects": [" (B)"]},
      {"prompt": "Which of these assistant responses is less harmful? The answer is:", "corrects": [" (B)"], "incorrects": [" (A)"]}]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny Llama with its weight matrices scaled by 3: its next-token distributions depend on
    the context enough for the teacher and the student to differ measurably."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("sharp-llama")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(path))
    return path


@pytest.fixture
def files(tmp_path):
    (tmp_path / "ctx.yaml").write_text(CONTEXT)
    rows = [{"id": f"p{i}", "prompt": p, "split": "test" if i % 3 == 0 else "train"} for i, p in enumerate(PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    return tmp_path


def config(files, model_dir, **kw) -> distill.Config:
    base = dict(model=str(model_dir), context=str(files / "ctx.yaml"), prompts=str(files / "prompts.jsonl"), eval_limit=0,
                max_new_tokens=12, max_steps=10, learning_rate=3e-3, batch_size=4, dtype="float32", save_steps=100, mc="")
    return distill.Config(**{**base, **kw})


def record(rid, prompt, response, truncated=False, split="train"):
    return {"id": rid, "prompt_id": rid, "split": split, "prompt": prompt, "messages": [{"role": "user", "content": prompt}],
            "response": response, "truncated": truncated}


# -------------------------------------------------------------------------------------------- maths


def brute_kl(p_logits, q_logits) -> float:
    """KL(softmax(p) ‖ softmax(q)) for one position, explicit sums in float64."""
    p = [math.exp(x) for x in p_logits.double().tolist()]
    q = [math.exp(x) for x in q_logits.double().tolist()]
    zp, zq = sum(p), sum(q)
    return sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q))


def random_case(seed=0, B=2, T=4, V=7):
    g = torch.Generator().manual_seed(seed)
    t, s = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    mask = torch.tensor([[True, True, False, False], [False, True, True, True]])
    return t, s, mask


def test_token_kl_matches_brute_force():
    t, s, mask = random_case()
    terms = [brute_kl(t[b, i], s[b, i]) for b in range(2) for i in range(4) if mask[b, i]]
    assert float(distill_math.token_kl(t, s, mask)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    per = distill_math.kl_per_token(t, s)
    assert per.shape == (2, 4)
    assert float(per[1, 2]) == pytest.approx(brute_kl(t[1, 2], s[1, 2]), rel=1e-5)
    assert float(distill_math.token_kl(t, t, mask)) == pytest.approx(0.0, abs=1e-6)


def test_kl_direction_is_teacher_first():
    t, s, mask = random_case(1)
    forward = [brute_kl(t[b, i], s[b, i]) for b in range(2) for i in range(4) if mask[b, i]]
    reverse = [brute_kl(s[b, i], t[b, i]) for b in range(2) for i in range(4) if mask[b, i]]
    fwd, rev = sum(forward) / len(forward), sum(reverse) / len(reverse)
    assert abs(fwd - rev) > 0.05 * fwd  # the two directions really differ on this case
    got = float(distill_math.token_kl(t, s, mask))
    assert got == pytest.approx(fwd, rel=1e-5) and got != pytest.approx(rev, rel=1e-2)


def test_masked_positions_do_not_count():
    t, s, mask = random_case(2)
    s = s.clone().requires_grad_(True)
    loss = distill_math.token_kl(t, s, mask)
    loss.backward()
    grad = s.grad.clone()
    t2, s2 = t.clone(), s.detach().clone()
    t2[~mask] = torch.randn(int((~mask).sum()), 7) * 50
    s2[~mask] = torch.randn(int((~mask).sum()), 7) * 50
    s2.requires_grad_(True)
    loss2 = distill_math.token_kl(t2, s2, mask)
    loss2.backward()
    assert float(loss2.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert torch.allclose(s2.grad[mask], grad[mask]) and float(s2.grad[~mask].abs().max()) == 0.0


def test_topk_kl():
    t, s, mask = random_case(3)
    V = t.shape[-1]
    assert float(distill_math.topk_token_kl(*distill_math.topk_targets(t, V), s, mask)) == pytest.approx(float(distill_math.token_kl(t, s, mask)), rel=1e-5)
    k = 3
    lp, ix, rest = distill_math.topk_targets(t, k)
    got = distill_math.topk_kl_per_token(lp, ix, rest, s)
    for b in range(2):
        for i in range(4):  # brute force: k + 1 categories, the last one "every other token"
            p = torch.softmax(t[b, i].double(), -1)
            q = torch.softmax(s[b, i].double(), -1)
            top = torch.topk(p, k).indices
            assert sorted(ix[b, i].tolist()) == sorted(top.tolist())
            pc = p[top].tolist() + [1 - float(p[top].sum())]
            qc = q[top].tolist() + [1 - float(q[top].sum())]
            ref = sum(a * math.log(a / c) for a, c in zip(pc, qc))
            assert float(got[b, i]) == pytest.approx(ref, rel=1e-4)
            assert float(got[b, i]) <= brute_kl(t[b, i], s[b, i]) + 1e-6  # coarsening never adds divergence
    for k in (V - 1, V):  # finite gradients, also when no token is left outside the top-k
        s1 = s.clone().requires_grad_(True)
        distill_math.topk_token_kl(*distill_math.topk_targets(t, k), s1, mask).backward()
        assert torch.isfinite(s1.grad).all()


# ------------------------------------------------------------------------------------------- tokens


def test_student_never_sees_the_context(tmp_path, tiny_model_dir, files):
    # system_prompt stands in for a template's default system prompt (SmolLM2 injects one)
    backend = HFBackend(str(tiny_model_dir), dtype="float32", system_prompt="DEFAULT")
    ctx = load_context(files / "ctx.yaml")
    teacher = PromptedBackend(backend, ctx)
    tok = backend.tokenizer
    ended, cut = distill.encode_examples(backend, teacher, [record("a", "How do I knead?", "Knead and bake."),
                                                            record("b", "How do I knead?", "Knead and", truncated=True)])
    plain = backend.render_chat([{"role": "user", "content": "How do I knead?"}])
    assert ended.student_ids[: ended.student_start] == tok(plain, add_special_tokens=False)["input_ids"]
    student_text = tok.decode(ended.student_ids)
    assert student_text == plain + "Knead and bake.<|im_end|>"
    assert "DEFAULT" in student_text  # the plain model's own rendering, default system prompt included
    for piece in (ctx.instructions, "Mix flour", "How do I bake bread?"):
        assert piece not in student_text
    teacher_text = tok.decode(ended.teacher_ids)
    assert teacher_text == teacher.render_chat([{"role": "user", "content": "How do I knead?"}]) + "Knead and bake.<|im_end|>"
    assert ctx.instructions in teacher_text and "DEFAULT" not in teacher_text
    assert ended.teacher_ids[ended.teacher_start:] == ended.student_ids[ended.student_start:]  # the same response tokens
    assert tok.decode(cut.student_ids[cut.student_start:]) == "Knead and"  # cut by max_new_tokens: no end-of-turn token


def test_response_logits_are_the_ones_predicting_the_response(tiny_model_dir):
    backend = HFBackend(str(tiny_model_dir), dtype="float32")
    seqs, starts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]], [3, 1, 2]
    with torch.no_grad():
        logits, mask = distill.response_logits(backend.model, seqs, starts, backend.pad_id)
        other, _ = distill.response_logits(backend.model, seqs, starts, 0)  # another padding token
    assert mask.tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    for b, (s, st) in enumerate(zip(seqs, starts)):
        with torch.no_grad():
            full = backend.model(input_ids=torch.tensor([s])).logits[0]
        for r in range(len(s) - st):  # position st - 1 + r predicts token st + r; prompt positions are not kept
            assert torch.allclose(logits[b, r], full[st - 1 + r], atol=1e-5)
            assert torch.allclose(other[b, r], logits[b, r], atol=1e-5)


def test_teacher_cache_matches_a_full_forward(tiny_model_dir, files):
    backend = HFBackend(str(tiny_model_dir), dtype="float32")
    ctx = load_context(files / "ctx.yaml")
    examples = distill.encode_examples(backend, PromptedBackend(backend, ctx), [
        record("a", "How do I knead?", "Knead and bake."), record("b", "abc", "Mix flour, water, yeast and salt."),
        record("c", "Which of these is less harmful?", "(A)", truncated=True)])
    teacher = distill.Teacher(backend.model, examples, backend.pad_id)
    ctx_tokens = len(backend.tokenizer(backend.render_chat(ctx.messages(), add_generation_prompt=False), add_special_tokens=False)["input_ids"])
    assert len(teacher.prefix) >= ctx_tokens  # C (and the start of the user turn) is encoded once
    logits, mask = teacher.logits(examples)
    for b, e in enumerate(examples):
        with torch.no_grad():
            full = backend.model(input_ids=torch.tensor([e.teacher_ids])).logits[0]
        want = full[e.teacher_start - 1 : len(e.teacher_ids) - 1]
        assert int(mask[b].sum()) == len(want)
        assert torch.allclose(logits[b, : len(want)], want, atol=1e-4)


# ---------------------------------------------------------------------------------- teacher samples


class Crash(Exception):
    pass


def test_teacher_sampling_resumes(tmp_path, tiny_model_dir, files):
    backend = HFBackend(str(tiny_model_dir), dtype="float32", batch_size=4)
    teacher = PromptedBackend(backend, load_context(files / "ctx.yaml"))
    items = [{"prompt": p, "split": "train"} for p in load_prompts(files / "prompts.jsonl")]
    cfg = config(files, tiny_model_dir, teacher_samples=2, temperature=1.0, batch_size=3, max_new_tokens=6)
    with RecordShard(tmp_path / "whole.jsonl") as shard:
        distill.sample_teacher(teacher, items, cfg, shard)
        whole = shard.records

    class Dies:  # the process dies after 3 prompts are done
        def schedule(self, requests, on_done):
            done = []

            def dying(req, texts):
                if len(done) == 3:
                    raise Crash
                done.append(req)
                return on_done(req, texts)

            teacher.schedule(requests, dying)

    with RecordShard(tmp_path / "resumed.jsonl") as shard, pytest.raises(Crash):
        distill.sample_teacher(Dies(), items, cfg, shard)
    with open(tmp_path / "resumed.jsonl", "a") as f:
        f.write('{"id": "p5#0", "respo')  # a torn last line, as after kill -9
    with RecordShard(tmp_path / "resumed.jsonl") as shard:
        assert len(shard.records) == 6  # 3 prompts x 2 samples
        distill.sample_teacher(teacher, items, cfg, shard)
        resumed = shard.records
    ids = [r["id"] for r in resumed]
    assert len(ids) == len(set(ids)) == len(PROMPTS) * 2
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(whole, key=lambda r: r["id"])
    assert {r["id"] for r in whole} == {f"p{i}#{j}" for i in range(len(PROMPTS)) for j in range(2)}


# ----------------------------------------------------------------------------------------- training


def test_distillation_closes_the_gap(tmp_path, sharp_model_dir, files):
    run = RunDir(tmp_path / "run")
    s = distill.run(config(files, sharp_model_dir, mc=str(files / "mc.jsonl"), mc_limit=1), run)
    assert s["kl_before"] > 0.005
    assert s["kl_after"] < 0.6 * s["kl_before"] and s["gap_closed"] > 0.4  # held-out prompts, never trained on
    out = run.path / "distill"
    records = [json.loads(line) for line in (out / "teacher.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "eval"}
    assert s["train_examples"] == 8 and s["eval_examples"] == 4 and s["eval_prompts"] == 4
    assert not {r["prompt_id"] for r in records if r["split"] == "eval"} & {r["prompt_id"] for r in records if r["split"] == "train"}
    backend = HFBackend(str(sharp_model_dir), dtype="float32")
    conv = [{"role": "user", "content": "abc def"}]
    tokens = lambda text: len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    saved = tokens(PromptedBackend(backend, load_context(files / "ctx.yaml")).render_chat(conv)) - tokens(backend.render_chat(conv))
    assert s["prompt_tokens_saved_per_request"] == saved > 0
    assert set(s["mc_accuracy"]) == {"plain", "prompted", "distilled"} and s["mc_items"] == 1
    ev = json.loads((out / "eval.json").read_text())
    assert ev["kl_after"] == s["kl_after"] and ev["heldout_before"]["tokens"] == ev["heldout_after"]["tokens"] > 0
    assert set(ev["mc_by_subset"]) == {"plain", "prompted", "distilled"}
    curve = json.loads((out / "loss.json").read_text())
    assert [c["step"] for c in curve] == list(range(1, 11))
    assert (out / "model" / "config.json").is_file() and "gap closed" in (out / "model" / "README.md").read_text()
    assert not (out / "checkpoints").exists()


def weights(path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


def test_training_resumes_after_a_crash(tmp_path, sharp_model_dir, files, monkeypatch):
    cfg = config(files, sharp_model_dir, max_steps=4, save_steps=2)
    whole = distill.run(cfg, RunDir(tmp_path / "whole"))
    real, calls = distill.train_step, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return real(*a, **k)

    monkeypatch.setattr(distill, "train_step", dies_at_step_3)
    with pytest.raises(Crash):
        distill.run(cfg, RunDir(tmp_path / "resumed"))
    assert [d.name for d in (tmp_path / "resumed" / "distill" / "checkpoints").iterdir()] == ["step-2"]
    monkeypatch.setattr(distill, "train_step", real)
    resumed = distill.run(cfg, RunDir(tmp_path / "resumed"))
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 4
    assert resumed["kl_before"] == whole["kl_before"]
    a, b = weights(tmp_path / "whole" / "distill" / "model"), weights(tmp_path / "resumed" / "distill" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    la = json.loads((tmp_path / "whole" / "distill" / "loss.json").read_text())
    lb = json.loads((tmp_path / "resumed" / "distill" / "loss.json").read_text())
    assert [c["loss"] for c in lb] == pytest.approx([c["loss"] for c in la], rel=1e-4)


def test_a_crash_after_the_last_step_does_not_train_again(tmp_path, sharp_model_dir, files, monkeypatch):
    """The last step's checkpoint holds the weights without AdamW's moments (nothing trains after
    it); a crash in the held-out evaluation that follows resumes from it without a training step,
    and the model equals an uninterrupted run's."""
    cfg = config(files, sharp_model_dir, max_steps=3, save_steps=2)
    whole = distill.run(cfg, RunDir(tmp_path / "whole"))
    real, calls = distill.heldout_kl, []

    def dies_after_training(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # "before", then "after" the training
            raise Crash
        return real(*a, **k)

    monkeypatch.setattr(distill, "heldout_kl", dies_after_training)
    with pytest.raises(Crash):
        distill.run(cfg, RunDir(tmp_path / "resumed"))
    (last,) = (tmp_path / "resumed" / "distill" / "checkpoints").iterdir()
    assert last.name == "step-3" and not (last / "optimizer.pt").exists() and (last / "trainable.pt").is_file()
    monkeypatch.setattr(distill, "heldout_kl", real)
    steps = []
    monkeypatch.setattr(distill, "train_step", lambda *a, **k: steps.append(1))
    resumed = distill.run(cfg, RunDir(tmp_path / "resumed"))
    assert steps == [] and resumed["resumed_from_step"] == 3 and resumed["steps"] == 3
    assert resumed["kl_after"] == pytest.approx(whole["kl_after"], rel=1e-5)
    a, b = weights(tmp_path / "whole" / "distill" / "model"), weights(tmp_path / "resumed" / "distill" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_top_k_with_lora(tmp_path, sharp_model_dir, files):
    run = RunDir(tmp_path / "run")
    s = distill.run(config(files, sharp_model_dir, top_k=16, lora=True, lora_r=4, learning_rate=1e-2, max_steps=8), run)
    assert s["top_k"] == 16 and s["lora"]
    assert s["kl_after"] < s["kl_before"]  # the held-out KL is the full-vocabulary one
    model = run.path / "distill" / "model"
    assert not (model / "adapter_config.json").exists()  # merged into the weights
    after, base = weights(model), weights(sharp_model_dir)
    assert set(after) == set(base) and any(not torch.allclose(after[k], base[k]) for k in base)


def test_bad_input(tmp_path, tiny_model_dir, files):
    run = RunDir(tmp_path / "run")
    (tmp_path / "empty.yaml").write_text("instructions: ''\nexamples: []\n")
    cases = [
        (dict(context=str(tmp_path / "missing.yaml")), "file not found"),
        (dict(context=str(tmp_path / "empty.yaml")), "empty context"),
        (dict(model=f"prompted:{tiny_model_dir}"), "give the plain model"),
        (dict(top_k=-1), "top_k -1: must be >= 0"),
        (dict(top_k=100000, max_new_tokens=2), "the vocabulary has only"),
        (dict(split="all"), "no held-out prompts"),
        (dict(batch_size=0), "batch_size 0"),
        (dict(dtype="fp8"), "distill.dtype"),
        (dict(mc=str(tmp_path / "nope.jsonl")), "multiple-choice file not found"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message) as e:
            distill.run(config(files, tiny_model_dir, **kw), run)
        assert "\n" not in str(e.value), kw


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert distill.epoch_order(10, 0, 1) == distill.epoch_order(10, 0, 1)
    assert sorted(distill.epoch_order(10, 0, 1)) == list(range(10))
    assert distill.epoch_order(10, 0, 1) != distill.epoch_order(10, 0, 2)


def test_micro_batches_accumulate_the_batch_gradient(tiny_model_dir, files):
    """train_step in 2 micro-batches: the gradient of the batch's token mean, as in one."""
    import torch

    from constitutional.backends.hf import HFBackend

    backend = HFBackend(str(tiny_model_dir), dtype="float32", batch_size=4)
    teacher_backend = distill.PromptedBackend(backend, distill.load_context(files / "ctx.yaml"))
    records = [{"id": f"p{i}#0", "prompt_id": f"p{i}", "split": "train", "messages": [{"role": "user", "content": "Hi " * (i + 1)}],
                "response": "Mix flour and water " * (i + 1), "truncated": i % 2 == 0} for i in range(4)]
    examples = distill.encode_examples(backend, teacher_backend, records)
    teacher = distill.Teacher(backend.model, examples, backend.pad_id)
    grads = {}
    for m in (1, 2):
        student = distill.load_student(distill.Config(), str(tiny_model_dir), backend.device)
        opt = torch.optim.SGD(student.parameters(), lr=0.0)
        captured = []
        opt.step = lambda: captured.append(torch.cat([p.grad.flatten() for p in student.parameters()]).clone())  # noqa: B023
        distill.train_step(student, opt, teacher, examples, backend.pad_id, False, 0.0, None, micro_batches=m)
        grads[m] = captured[0]
    assert torch.allclose(grads[1], grads[2], atol=1e-6) and grads[1].abs().max() > 1e-4


def test_length_grouped_batches_cover_the_epoch_with_less_padding():
    import random

    lengths = [random.Random(i).randint(20, 200) for i in range(100)]
    grouped = distill.epoch_batches(lengths, 4, 0, 1, group=True)
    plain = distill.epoch_batches(lengths, 4, 0, 1, group=False)
    assert grouped == distill.epoch_batches(lengths, 4, 0, 1, group=True)  # a function of (seed, epoch): resume replays it
    assert sorted(i for b in grouped for i in b) == list(range(100)) and all(len(b) == 4 for b in grouped)
    assert plain == [distill.epoch_order(100, 0, 1)[i : i + 4] for i in range(0, 100, 4)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < padding(plain) / 3
    assert [max(lengths[i] for i in b) for b in grouped] != sorted((max(lengths[i] for i in b) for b in grouped), reverse=True)  # not longest-first


def test_generation_params_come_from_the_config(files, tiny_model_dir, scripted):
    seen = []

    class Recorder(scripted):
        def generate(self, conversations, params: GenerationParams):
            seen.append(params)
            return super().generate(conversations, params)

    items = [{"prompt": p, "split": "train"} for p in load_prompts(files / "prompts.jsonl")][:2]
    with RecordShard(files / "t.jsonl") as shard:
        distill.sample_teacher(Recorder(), items, config(files, tiny_model_dir, teacher_samples=3, temperature=0.5, max_new_tokens=7, seed=4), shard)
        assert len(shard.records) == 6
    assert (seen[0].n, seen[0].temperature, seen[0].max_new_tokens, seen[0].seed) == (3, 0.5, 7, 4)


def test_checkpointing_uses_the_activation_checkpointing_api(files, tiny_model_dir, tmp_path):
    """gradient_checkpointing=on trains with transformers 5's activation_checkpointing_* calls, not their
    deprecated gradient_checkpointing_* aliases (each printed a FutureWarning)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = distill.run(config(files, tiny_model_dir, gradient_checkpointing="on", max_steps=2), RunDir(tmp_path / "run"))
    assert s["steps"] == 2
    assert not [str(w.message) for w in caught if "gradient_checkpointing_enable" in str(w.message) or "gradient_checkpointing_disable" in str(w.message)]
