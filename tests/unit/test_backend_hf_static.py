"""The hf backend's static-cache decode path against its dynamic path, on the tiny random Llama (CPU, float32).

Both paths must give the same tokens, `ended`/`truncated` flags and counters: greedy, seeded
sampling with n > 1, repetition penalty, eos and stop strings, a short last batch (padded with dummy
rows), and the context end. One test compiles the decode step with torch.compile on CPU (slow).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from constitutional.backends.base import GenerationParams
from constitutional.backends.hf import HFBackend
from constitutional.errors import UserError

FEW_SHOT = "Here are examples of careful answers. " * 4
QUESTIONS = [
    "How do I bake bread?",
    "hi",
    "Which of these assistant responses is less harmful? Please rewrite it.",
    "abc",
    "The answer is:",
    "Identify specific ways in which the last response is harmful.",
]
CONVS = [FEW_SHOT + q for q in QUESTIONS]  # a shared prefix, suffixes of different lengths


def pair(model_dir, batch_size=4, **static_options):
    kw = dict(dtype="float32", batch_size=batch_size, min_prefix_tokens=8)
    dyn = HFBackend(str(model_dir), static_cache="off", **kw)
    st = HFBackend(str(model_dir), **{"static_cache": "on", "compile": "off", **static_options}, **kw)
    assert not dyn.use_static_cache and st.use_static_cache
    return dyn, st


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """The shared tiny Llama with larger random weights: at the default init its greedy output is one
    token repeated whatever the prompt, which would make token equality a weak check."""
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-lively")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.4)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def backends(model_dir):
    return pair(model_dir)


def test_greedy_is_token_identical(backends):
    dyn, st = backends
    dyn.stats = {k: 0 for k in dyn.stats}
    st.stats = {k: 0 for k in st.stats}
    params = GenerationParams(max_new_tokens=10, temperature=0)
    ours = st._generate(CONVS, params)
    assert ours == dyn._generate(CONVS, params)
    assert st.stats["generated_tokens"] == dyn.stats["generated_tokens"]
    assert st.stats["prefix_tokens_reused"] > 0 and dyn.stats["prefix_tokens_reused"] > 0  # the shared prefix was copied into the static cache
    assert len({len(st._encode_chat(c)) for c in CONVS}) > 3  # the rows really have different lengths
    assert all(len(set(ids)) > 2 for ids, _ in ours)  # and the model does not just repeat one token
    # 6 prompts in batches of 4: the last batch of 2 ran as 2 static rows, the first as 4
    (rows, length), cache = next(reversed(st._static.items()))  # the latest static cache
    assert rows == 2 and length % 256 == 0
    assert [k[0] for k in list(st._static)[-2:]] == [4, 2]
    again = st._generate(CONVS, params)  # the kept caches are reset and reused
    assert again == ours and st._static[(rows, length)] is cache


def test_without_shared_prefix(model_dir):
    dyn, st = pair(model_dir, batch_size=3)
    params = GenerationParams(max_new_tokens=8, temperature=0)
    convs = QUESTIONS[:5]
    assert st._generate(convs, params) == dyn._generate(convs, params)
    assert st.stats["prefix_tokens_reused"] == 0


def test_seeded_sampling_with_n_and_penalty(backends):
    dyn, st = backends
    for params in (
        GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, n=3, seed=5),
        GenerationParams(max_new_tokens=12, temperature=0.7, n=2, seed=1, repetition_penalty=1.3),
    ):
        ours = st._generate(CONVS, params)
        assert ours == dyn._generate(CONVS, params)
        assert len(ours) == len(CONVS) * params.n
        assert any(a != b for (a, _), (b, _) in zip(ours[::params.n], ours[1::params.n]))  # samples differ


def test_eos_stop_and_truncation_flags(backends):
    dyn, st = backends
    params = GenerationParams(max_new_tokens=12, temperature=0)
    greedy = dyn.generate_ids(CONVS, params)
    # an end token the random model emits mid-way in some rows: rows end at different steps
    eos = next(t for ids in greedy for t in ids[3:8] if sum(t in g for g in greedy) < len(greedy))
    saved = set(dyn.eos_ids)
    try:
        dyn.eos_ids = st.eos_ids = saved | {eos}
        a, b = dyn._generate(CONVS, params), st._generate(CONVS, params)
        assert a == b
        assert {ended for _, ended in a} == {True, False}
    finally:
        dyn.eos_ids = st.eos_ids = saved
    sampled = GenerationParams(max_new_tokens=16, temperature=1.0, seed=2)
    texts = dyn.generate(CONVS, sampled)
    stop = next(t[3:5] for t in texts if len(t) > 6 and t[3:5].strip())
    sampled.stop = [stop]
    a, b = dyn.generate(CONVS, sampled), st.generate(CONVS, sampled)
    assert a == b and [x.truncated for x in a] == [x.truncated for x in b]
    assert {x.truncated for x in a} == {True, False}  # some rows hit the stop string, some ran out


def test_small_last_batch_pads_with_dummy_rows(model_dir):
    dyn, st = pair(model_dir, batch_size=8)
    assert [st._static_rows(b) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    st.batch_size = 6
    assert [st._static_rows(b) for b in (3, 5, 6)] == [4, 6, 6]
    st.batch_size = 8
    params = GenerationParams(max_new_tokens=6, temperature=1.0, n=2, seed=9)
    convs = CONVS[:5]  # 10 requests: one batch of 8 and one of 2
    assert st._generate(convs, params) == dyn._generate(convs, params)
    params = GenerationParams(max_new_tokens=6, temperature=0)
    assert st._generate(convs[:3], params) == dyn._generate(convs[:3], params)  # 3 real rows + 1 dummy
    assert list(st._static)[-1][0] == 4


def test_context_end_limits_new_tokens(model_dir):
    dyn, st = pair(model_dir)
    longest = max(len(dyn._encode_chat(c)) for c in CONVS)
    for b in (dyn, st):
        b.max_positions = longest + 3  # the longest prompt has room for 3 new tokens
    params = GenerationParams(max_new_tokens=20, temperature=0)
    a, b = dyn._generate(CONVS, params), st._generate(CONVS, params)
    assert a == b
    assert max(len(ids) for ids, _ in a) == 20 and min(len(ids) for ids, _ in a) <= 3
    assert any(len(ids) == 3 and not ended for ids, ended in a)


def test_options_and_environment(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("CAI_STATIC_CACHE", raising=False)
    monkeypatch.delenv("CAI_COMPILE", raising=False)
    b = HFBackend(str(tiny_model_dir), dtype="float32", device="cpu")
    assert not b.use_static_cache and not b.use_compile  # auto: off on CPU
    b = HFBackend(str(tiny_model_dir), dtype="float32", device="cpu", compile="on")
    assert b.use_static_cache and b.use_compile  # compiling implies the static cache
    monkeypatch.setenv("CAI_STATIC_CACHE", "on")
    b = HFBackend(str(tiny_model_dir), dtype="float32", device="cpu")
    assert b.use_static_cache and not b.use_compile
    assert not HFBackend(str(tiny_model_dir), dtype="float32", static_cache="off").use_static_cache  # option beats env
    monkeypatch.setenv("CAI_STATIC_CACHE", "fast")
    with pytest.raises(UserError, match="CAI_STATIC_CACHE"):
        HFBackend(str(tiny_model_dir), dtype="float32")
    monkeypatch.delenv("CAI_STATIC_CACHE")
    with pytest.raises(UserError, match="static_cache='yes'"):
        HFBackend(str(tiny_model_dir), static_cache="yes")
    with pytest.raises(UserError, match="compile="):
        HFBackend(str(tiny_model_dir), compile="max")
    with pytest.raises(UserError, match="needs the static cache"):
        HFBackend(str(tiny_model_dir), static_cache="off", compile="on")


def test_from_model_wraps_a_loaded_model(backends):
    dyn, _ = backends
    b = HFBackend.from_model(dyn.model, dyn.tokenizer, name="wrapped", batch_size=4, min_prefix_tokens=8, static_cache="on")
    assert b.name == "wrapped" and b.dtype == torch.float32 and b.device == dyn.device and b.use_static_cache
    params = GenerationParams(max_new_tokens=5, temperature=0)
    assert b.generate_ids(CONVS[:3], params) == dyn.generate_ids(CONVS[:3], params)


@pytest.mark.slow
def test_compiled_decode_on_cpu(model_dir):
    """torch.compile (inductor, fullgraph, dynamic=False) of the decode step: the graph the CUDA path
    captures, here without CUDA graphs (with them where a GPU is present). About 15 s with a cold
    inductor cache (a few s warm), nearly all of it compilation."""
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (inductor), none found")
    import torch._dynamo
    import torch._inductor.config

    saved_threads = torch._inductor.config.compile_threads
    torch._inductor.config.compile_threads = 1  # keep the compile off the other cores
    try:
        dyn, st = pair(model_dir, compile="on")
        assert st.use_compile
        convs = CONVS[:4]  # one batch of 4 rows: one graph for both calls
        for params in (GenerationParams(max_new_tokens=8, temperature=0), GenerationParams(max_new_tokens=8, temperature=1.0, seed=4, repetition_penalty=1.2)):
            try:
                ours = st._generate(convs, params)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # a toolchain problem, not ours
                pytest.skip(f"inductor cannot compile on this machine: {str(e).splitlines()[0][:200]}")
            assert ours == dyn._generate(convs, params)
    finally:
        torch._inductor.config.compile_threads = saved_threads
        torch._dynamo.reset()


def test_a_failing_static_path_falls_back_to_the_dynamic_one(model_dir, capsys):
    """On a device where the (unverified) static/compiled decode breaks, the first batch says so on
    stderr and the backend continues on the dynamic path with the same results."""
    dyn, st = pair(model_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA graph capture failed (simulated)")

    st._generate_batch_static = broken
    params = GenerationParams(max_new_tokens=6, temperature=0)
    assert st._generate(CONVS, params) == dyn._generate(CONVS, params)
    assert not st.use_static_cache and "static-cache decode failed" in capsys.readouterr().err
