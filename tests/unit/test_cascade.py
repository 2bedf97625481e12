"""Shared-prefix (cascade) attention (`hf_cascade.py`): the exact attention, one copy of the prefix.

Against references: the attention function against SDPA over [prefix copied per row, own keys]
with groups of rows, rows without a prefix, several queries and GQA; the backend with cascade on
against the same backend with the prefix copied per row (greedy tokens, seeded samples, option
log-probabilities, and the brute-force scorer); which models it is used for."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from constitutional.backends import hf_cascade
from constitutional.backends.base import GenerationParams
from constitutional.backends.hf import HFBackend
from constitutional.backends.hf_cascade import Group, cascade_attention, supported

from test_backend_hf import CONVS
from test_scheduler import LONG


class _Layer:
    def __init__(self, layer_idx: int):
        self.layer_idx = layer_idx


def _prefix_cache(k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    cache.update(k, v, 0)
    return cache


@pytest.fixture(params=["flash kernel", "plain products"])
def kernel(request, monkeypatch):
    """Both ways `_attend` computes a part: torch's CPU flash kernel and the plain products (other devices)."""
    if request.param == "plain products":
        monkeypatch.setattr(hf_cascade, "_FLASH_CPU", None)
    elif hf_cascade._FLASH_CPU is None:
        pytest.skip("this torch has no CPU flash attention kernel")
    return request.param


def test_cascade_attention_matches_sdpa_over_the_copied_prefix(kernel):
    torch.manual_seed(0)
    B, H, Hkv, T, S, d = 5, 6, 2, 3, 7, 8
    P = {"a": 11, "b": 4}
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    pk = {n: torch.randn(1, Hkv, p, d) for n, p in P.items()}
    pv = {n: torch.randn(1, Hkv, p, d) for n, p in P.items()}
    own = torch.rand(B, T, S) > 0.4
    own[:, :, -1] = True  # every query sees one own key at least (as the backend's layouts ensure)
    rows = {"a": [0, 3], "b": [1]}  # rows 2 and 4 read no prefix
    groups = [Group(torch.tensor(r), _prefix_cache(pk[n], pv[n])) for n, r in rows.items()]
    hf_cascade._local.state = (groups, own, {})
    try:
        got, _ = cascade_attention(_Layer(0), q, k, v, None, scaling=0.3)
    finally:
        hf_cascade._local.state = None
    for r in range(B):
        name = next((n for n, rs in rows.items() if r in rs), None)
        kk, vv, mask = k[r : r + 1], v[r : r + 1], own[r : r + 1]
        if name:
            kk, vv = torch.cat([pk[name], kk], 2), torch.cat([pv[name], vv], 2)
            mask = torch.cat([torch.ones(1, T, P[name], dtype=torch.bool), mask], 2)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[r : r + 1], kk.repeat_interleave(H // Hkv, 1), vv.repeat_interleave(H // Hkv, 1), attn_mask=mask[:, None], scale=0.3
        )
        torch.testing.assert_close(got[r], ref[0].transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_cascade_attention_with_every_row_in_one_group(kernel):
    torch.manual_seed(1)
    B, H, Hkv, T, S, d, P = 3, 4, 4, 1, 5, 8, 9  # no GQA, one decode query
    q, k, v = torch.randn(B, H, T, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    pk, pv = torch.randn(1, Hkv, P, d), torch.randn(1, Hkv, P, d)
    own = torch.ones(B, T, S, dtype=torch.bool)
    hf_cascade._local.state = ([Group(None, _prefix_cache(pk, pv))], own, {})
    try:
        got, _ = cascade_attention(_Layer(0), q, k, v, None)
    finally:
        hf_cascade._local.state = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, torch.cat([pk.expand(B, -1, -1, -1), k], 2), torch.cat([pv.expand(B, -1, -1, -1), v], 2))
    torch.testing.assert_close(got, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def _pair(tiny_model_dir, **kw):
    on = HFBackend(str(tiny_model_dir), dtype="float32", min_prefix_tokens=4, **kw)
    off = HFBackend(str(tiny_model_dir), dtype="float32", min_prefix_tokens=4, **kw)
    off.cascade_ok = False
    on.cascade_min_prefix = 4  # the tiny prompts' shared prefixes are short
    assert on.cascade_ok
    return on, off


def test_backend_with_cascade_matches_the_copied_prefix(tiny_model_dir, monkeypatch):
    calls = []
    real = hf_cascade.cascade_attention
    monkeypatch.setattr(hf_cascade, "cascade_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    for rows, budget in ((2, 256), (64, 100_000)):
        on, off = _pair(tiny_model_dir, max_rows=rows, token_budget=budget)
        greedy = GenerationParams(max_new_tokens=12, temperature=0)
        assert on.generate_ids(CONVS + LONG, greedy) == off.generate_ids(CONVS + LONG, greedy), rows
        sampled = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, n=2, seed=3, repetition_penalty=1.3)
        assert on.generate_ids(LONG + CONVS, sampled) == off.generate_ids(LONG + CONVS, sampled), rows
    assert calls, "cascade attention was never used"
    # while the batch holds rows with a cached prefix, its columns hold their own tokens only
    assert on.stats["prefix_tokens_reused"] > 0


def test_scoring_with_cascade_matches_brute_force(tiny_model_dir):
    on, off = _pair(tiny_model_dir, batch_size=3)
    head = "Here are worked examples of careful answers. " * 6
    prompts = [head + q for q in ("Which is better?", "Pick one:", "Is it (A) or (B)? The answer is:", "?")]
    options = [[" (A)", " (B)"], [" yes", " no", " maybe"], [" (A)", " (B)"], [" x"]]
    got, ref = on.option_logprobs(prompts, options), off.option_logprobs(prompts, options)
    assert on.stats["prefix_tokens_reused"] > 0
    for g, r, p, o in zip(got, ref, prompts, options):
        assert g == pytest.approx(r, abs=1e-4)
        assert g == pytest.approx(on.brute_force_option_logprobs(p, o), abs=1e-4)


def test_short_prefixes_are_copied(tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_cascade, "cascade_attention", lambda *a, **k: calls.append(1))
    b = HFBackend(str(tiny_model_dir), dtype="float32", min_prefix_tokens=4)
    assert b.cascade_min_prefix == hf_cascade.MIN_PREFIX > 100
    b.generate_ids(LONG, GenerationParams(max_new_tokens=3, temperature=0))
    assert b.stats["prefix_tokens_reused"] > 0 and not calls


def test_cascade_is_used_for_plain_full_attention_models_only():
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa"))
    assert supported(llama)
    llama.config._attn_implementation = "eager"
    assert supported(llama)
    windowed = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert not supported(windowed)


def test_cascade_restores_the_attention_function(tiny_backend):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = tiny_backend.model.config._attn_implementation
    before = ALL_ATTENTION_FUNCTIONS.get(name)
    with pytest.raises(RuntimeError):
        with hf_cascade.cascade(tiny_backend.model, [], torch.ones(1, 1, 1, dtype=torch.bool)):
            assert ALL_ATTENTION_FUNCTIONS[name] is hf_cascade.cascade_attention
            raise RuntimeError
    assert ALL_ATTENTION_FUNCTIONS.get(name) is before


@pytest.mark.parametrize("convs", [LONG, LONG[:1]], ids=["after a shared prefix", "alone: no shared prefix"])
def test_finished_prompts_are_kept_for_the_requests_that_extend_or_repeat_them(tiny_model_dir, monkeypatch, convs):
    """As revise runs: a critique's answer is followed by a revision request that extends its prompt,
    and a failed revision by a retry of the same prompt. Keeping the finished prompts' KV computes
    fewer prefill tokens and gives the same tokens as prefilling every prompt in full."""
    from constitutional.backends.base import Request, run_queue
    from constitutional.backends.hf_decode import ContinuousDecoder

    greedy = GenerationParams(max_new_tokens=6, temperature=0)

    def chains(b):
        out = {}

        def on_done(req, texts):
            i, step = req.key
            out[(i, step)] = str(texts[0])
            if step == 0:  # the "revision": the conversation, its answer, a new request
                return [Request(req.conversation + [{"role": "assistant", "content": str(texts[0])},
                                                    {"role": "user", "content": "Now rewrite it."}], greedy, key=(i, 1))]
            if step == 1:  # the "retry": the same prompt again
                return [Request(req.conversation, greedy, key=(i, 2))]
            return []

        run_queue(b, [Request(c, greedy, key=(i, 0)) for i, c in enumerate(convs)], on_done)
        return out

    keep, _ = _pair(tiny_model_dir, max_rows=3)
    full, _ = _pair(tiny_model_dir, max_rows=3)
    got = chains(keep)
    monkeypatch.setattr(ContinuousDecoder, "_keep_prompt", lambda self, slot, row: None)
    ref = chains(full)
    assert got == ref
    assert keep.stats["prompts_kept"] >= len(convs)
    assert keep.stats["prefill_tokens"] < full.stats["prefill_tokens"]
    for i in range(len(convs)):
        assert got[(i, 1)] == got[(i, 2)]  # a retry of a greedy request repeats it


def test_kept_prefixes_stay_within_their_token_budget(tiny_backend):
    b = tiny_backend
    before = b.prefix_cache_tokens
    try:
        b.prefix_cache_tokens = 10
        b._prefix_kv.clear()
        for n in (4, 5):
            b._remember(tuple(range(n)), object())
        assert list(b._prefix_kv) == [tuple(range(4)), tuple(range(5))]  # 9 tokens fit
        b._remember((7,), object())
        b._remember(tuple(range(4)), b._prefix_kv[tuple(range(4))])  # used again: now the most recent
        b._remember(tuple(range(6)), object())  # 16 tokens: the least recently used go until 10 fit
        assert list(b._prefix_kv) == [tuple(range(4)), tuple(range(6))]
        b._remember(tuple(range(50)), object())
        assert list(b._prefix_kv) == [tuple(range(50))]  # one always stays
    finally:
        b.prefix_cache_tokens = before
        b._prefix_kv.clear()


def test_kept_prompts_go_when_the_schedule_ends(tiny_model_dir):
    b, _ = _pair(tiny_model_dir)
    b.generate_ids(LONG, GenerationParams(max_new_tokens=3, temperature=0))
    assert b.stats["prompts_kept"] >= len(LONG)
    longest = max(len(p) for p in b._prefix_kv)
    assert longest < min(len(b._encode_chat(c)) for c in LONG) - 1  # the shared prefixes stay, the prompts went
