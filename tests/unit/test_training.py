"""Shared training helpers: dtype resolution, the errors for a model that cannot be trained, the
activation-memory estimate and the gradient checkpointing decision, the speed summary."""

from __future__ import annotations

import pytest

from constitutional.errors import UserError
from constitutional.training import load_causal_lm, training_dtype


def test_training_dtype():
    assert training_dtype("auto") in ("bfloat16", "float32")
    assert training_dtype("float32") == "float32" and training_dtype("bfloat16") == "bfloat16"
    with pytest.raises(UserError, match="dtype 'int8'"):
        training_dtype("int8")


def test_load_causal_lm_errors_name_the_setting(tmp_path, tiny_model_dir):
    model, tokenizer = load_causal_lm(str(tiny_model_dir), "sft.model")
    assert tokenizer.chat_template and next(model.parameters()).dtype.is_floating_point
    with pytest.raises(UserError, match="sft.model .*directory not found"):
        load_causal_lm(str(tmp_path / "nope"), "sft.model")
    with pytest.raises(UserError, match="a prompted model has no weights"):
        load_causal_lm("prompted:embedded", "rl.policy")


def _saved_bytes(model, ids, bf16: bool) -> int:
    """What autograd keeps for backward in a forward + log-softmax loss: the storages the saved
    tensors use (each once), the parameters themselves left out."""
    import torch

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1).mean()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_estimate_matches_what_autograd_saves(bf16):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from constitutional.training import activation_bytes

    for h, inter, heads, kv in [(128, 352, 4, 2), (192, 256, 6, 6)]:
        cfg = LlamaConfig(vocab_size=1000, hidden_size=h, intermediate_size=inter, num_hidden_layers=3, num_attention_heads=heads,
                          num_key_value_heads=kv, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 1000, (2, 96))
        measured = _saved_bytes(model, ids, bf16)
        estimate = activation_bytes(cfg, 2 * 96, bf16, sum(p.numel() for p in model.parameters()))
        assert 0.9 * measured < estimate < 1.15 * measured, (h, inter, kv, estimate, measured)
        with_ckpt = activation_bytes(cfg, 2 * 96, bf16, sum(p.numel() for p in model.parameters()), checkpointing=True)
        assert with_ckpt < estimate


def test_micro_batches_then_checkpointing_until_a_step_fits(tiny_model_dir, monkeypatch, capsys):
    from constitutional import training

    model, _ = load_causal_lm(str(tiny_model_dir), "sft.model")
    n = sum(p.numel() for p in model.parameters())
    lengths = [300, 280, 120, 100, 90]  # the worst batch of 4: the four longest

    def act(tokens, ckpt=False):
        return training.activation_bytes(model.config, tokens, False, n, checkpointing=ckpt)

    def plan(setting="auto", padded=True, free=None, limit_mb=0):
        if free is not None:
            monkeypatch.setattr(training, "free_memory", lambda device: free)
        return training.plan_step(setting, model.config, lengths, 4, padded, False, n, n, "sft.gradient_checkpointing", held=4 * n, limit_mb=limit_mb)

    monkeypatch.setattr(training, "rss", lambda: 100 * 2**20)
    fixed = 16 * n  # weights, gradients, AdamW's moments
    p = plan(free=10 * 2**30)
    assert (p.micro_batches, p.checkpointing) == (1, False) and p.facts["memory_budget_mb"] == 100 + 10 * 1024
    assert "batch of 4 in 1 micro-batch, gradient checkpointing off" in capsys.readouterr().err
    # padded: a micro-batch of 2 is 2 x 300 tokens; padding-free: 300 + 280
    just_two = fixed + act(2 * 300)
    assert plan(free=int(just_two / 0.8) + 1).micro_batches == 2 and plan(free=int(just_two / 0.8) - 1).micro_batches == 4
    assert plan(padded=False, free=int((fixed + act(580)) / 0.8) + 1).micro_batches == 2
    # not even 4 micro-batches fit: checkpointing, with the fewest micro-batches that then fit
    room = fixed + act(300) - 1
    expect = min(m for m in (1, 2, 4) if fixed + act(4 // m * 300, ckpt=True) <= room)
    p = plan(free=int(room / 0.8))
    assert (p.micro_batches, p.checkpointing) == (expect, True)
    # a budget for the process: what it holds now is spent from it
    limit = 100 + int(room / 0.8 / 2**20)
    p = plan(limit_mb=limit)
    assert p.checkpointing and p.facts["memory_budget_mb"] == limit
    p = plan(limit_mb=101)
    assert (p.micro_batches, p.checkpointing) == (4, True) and "may not fit" in capsys.readouterr().err
    assert plan("on", free=10 * 2**30).checkpointing and not plan("false", limit_mb=101).checkpointing
    with pytest.raises(UserError, match="sft.gradient_checkpointing 'sometimes'"):
        plan("sometimes")


def test_speed():
    from constitutional.training import speed

    assert speed(10.0, 4, 2000) == {"seconds_per_step": 2.5, "tokens_per_second": 200.0}
    assert speed(0.0, 0, 0) == {"seconds_per_step": 0.0, "tokens_per_second": None}
