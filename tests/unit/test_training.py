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


def test_checkpointing_is_decided_by_memory(tiny_model_dir, monkeypatch, capsys):
    from constitutional import training

    model, _ = load_causal_lm(str(tiny_model_dir), "sft.model")
    n = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(training, "free_memory", lambda device: 10 * 2**30)
    on, facts = training.decide_checkpointing("auto", model, 512, False, n, "sft.gradient_checkpointing")
    assert not on and facts["gradient_checkpointing"] is False and facts["memory_free_mb"] == 10 * 1024
    assert "gradient checkpointing off" in capsys.readouterr().err
    need = training.activation_bytes(model.config, 512, False, n) + 12 * n
    monkeypatch.setattr(training, "free_memory", lambda device: int(need / 0.8) - 1)  # just does not fit
    assert training.decide_checkpointing("auto", model, 512, False, n, "sft.gradient_checkpointing")[0]
    monkeypatch.setattr(training, "free_memory", lambda device: int(need / 0.8) + 1)  # just fits
    assert not training.decide_checkpointing("auto", model, 512, False, n, "sft.gradient_checkpointing")[0]
    assert training.decide_checkpointing("auto", model, 512, False, n, "sft.gradient_checkpointing", extra=2**20)[0]  # a model still to load
    assert training.decide_checkpointing("on", model, 1, False, 0, "x.gradient_checkpointing")[0]
    assert not training.decide_checkpointing("false", model, 10**9, False, n, "x.gradient_checkpointing")[0]
    with pytest.raises(UserError, match="rl.gradient_checkpointing 'sometimes'"):
        training.decide_checkpointing("sometimes", model, 1, False, 0, "rl.gradient_checkpointing")


def test_speed():
    from constitutional.training import speed

    assert speed(10.0, 4, 2000) == {"seconds_per_step": 2.5, "tokens_per_second": 200.0}
    assert speed(0.0, 0, 0) == {"seconds_per_step": 0.0, "tokens_per_second": None}
