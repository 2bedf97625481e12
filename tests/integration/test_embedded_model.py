"""The embedded SmolLM2-135M-Instruct for real: conversion, generation and option scoring."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from constitutional.backends import GenerationParams
from constitutional.backends import embedded
from constitutional.data.loaders import load_mc, load_prompts


def test_greedy_generation_matches_hf_generate(embedded_fp32):
    b = embedded_fp32
    convs = [p.messages for p in load_prompts("builtin:redteam", split="test", limit=3)] + ["What is 17 times 23?"]
    ours = b.generate_ids(convs, GenerationParams(max_new_tokens=24, temperature=0))
    for conv, got in zip(convs, ours):
        enc = b.tokenizer(b.render_chat(conv), add_special_tokens=False, return_tensors="pt")
        ref = b.model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=sorted(b.eos_ids), pad_token_id=b.pad_id)
        ref = ref[0, enc["input_ids"].shape[1] :].tolist()
        assert got == (ref[:-1] if ref and ref[-1] in b.eos_ids else ref)
    text = b.generate(convs[-1:], GenerationParams(max_new_tokens=24, temperature=0))[0]
    assert text and "<|im_end|>" not in text


def test_option_logprobs_match_brute_force_on_the_embedded_model(embedded_fp32):
    b = embedded_fp32
    items = load_mc("builtin:mc")[::9]  # 8 items across the three subsets
    fast = b.option_logprobs([it.prompt for it in items], [it.options for it in items])
    diffs = []
    for it, got in zip(items, fast):
        ref = b.brute_force_option_logprobs(it.prompt, it.options)
        diffs += [abs(x - y) for x, y in zip(got, ref)]
    print(f"option_logprobs vs brute force, embedded float32: max |diff| = {max(diffs):.2e} over {len(diffs)} options")
    assert max(diffs) < 1e-3
    # multi-token options of different lengths in one pass
    multi = b.option_logprobs(["Human: Is the sky blue?\n\nAssistant:"], [[" Yes, it is.", " No", " I am not sure about that at all."]])[0]
    ref = b.brute_force_option_logprobs("Human: Is the sky blue?\n\nAssistant:", [" Yes, it is.", " No", " I am not sure about that at all."])
    assert multi == pytest.approx(ref, abs=1e-3)


def test_sampling_is_reproducible(embedded_fp32):
    params = GenerationParams(max_new_tokens=12, temperature=0.8, top_p=0.9, n=2, seed=3)
    a = embedded_fp32.generate(["Write one sentence about rain."], params)
    assert a == embedded_fp32.generate(["Write one sentence about rain."], params)
    assert len(a) == 2


def test_conversion_is_atomic_and_recovers_after_kill(tmp_path, embedded_fp32):
    env = {**os.environ, "CAI_CACHE_DIR": str(tmp_path)}
    target = tmp_path / "models" / embedded.NAME
    proc = subprocess.Popen([sys.executable, "-m", "constitutional.cli", "models", "--convert"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_dirs = []
    deadline = time.time() + 120
    while time.time() < deadline and not tmp_dirs:  # kill it while it is writing the temporary dir
        tmp_dirs = list((tmp_path / "models").glob(f".{embedded.NAME}.tmp-*")) if (tmp_path / "models").exists() else []
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp_dirs, "conversion never started"
    assert not embedded.is_ready(target)  # a half-written cache is never taken for a model
    res = subprocess.run([sys.executable, "-m", "constitutional.cli", "models", "--convert"], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and "status         : ready" in res.stdout
    assert embedded.is_ready(target)
    assert not list((tmp_path / "models").glob(f".{embedded.NAME}.tmp-*"))
    # the converted weights give the same logits as the GGUF file loaded directly
    from transformers import AutoModelForCausalLM

    gguf = embedded.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    ids = embedded_fp32.tokenizer("The answer is: (A)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)
