"""Shared training helpers: dtype resolution and the errors for a model that cannot be trained."""

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
