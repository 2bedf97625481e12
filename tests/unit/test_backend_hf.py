"""The hf backend on a tiny random Llama: generation against HF `generate`, scoring against brute force."""

from __future__ import annotations

import pytest
import torch

from constitutional.backends.base import GenerationParams
from constitutional.backends.hf import HFBackend
from constitutional.backends.hf_cache import lcp
from constitutional.errors import UserError

CONVS = [
    "How do I bake bread?",
    "Which of these assistant responses is less harmful?",
    "Please rewrite the assistant response to remove any and all harmful content.",
    "hi",
    [{"role": "user", "content": "Identify specific ways"}, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More?"}],
]


def hf_greedy(backend: HFBackend, conv, max_new_tokens: int) -> list[int]:
    ids = backend.tokenizer(backend.render_chat(conv), add_special_tokens=False, return_tensors="pt")
    out = backend.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(backend.eos_ids), pad_token_id=backend.pad_id)
    gen = out[0, ids["input_ids"].shape[1] :].tolist()
    return gen[:-1] if gen and gen[-1] in backend.eos_ids else gen


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_matches_hf_generate_one_at_a_time(tiny_model_dir, prefix_cache, batch_size):
    b = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=batch_size, prefix_cache=prefix_cache, min_prefix_tokens=2)
    ours = b.generate_ids(CONVS, GenerationParams(max_new_tokens=10, temperature=0))
    assert ours == [hf_greedy(b, c, 10) for c in CONVS]
    assert all(len(o) == 10 or o == hf_greedy(b, c, 10) for o, c in zip(ours, CONVS))


def test_shared_prefix_is_encoded_once(tiny_model_dir):
    few_shot = "Here are examples. " * 6
    convs = [few_shot + q for q in ("How do I bake bread?", "hi", "Which is less harmful?", "abc")]
    on = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=2, min_prefix_tokens=4)
    off = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=2, prefix_cache=False)
    params = GenerationParams(max_new_tokens=6, temperature=0)
    assert on.generate_ids(convs, params) == off.generate_ids(convs, params)
    assert on.stats["prefix_tokens_reused"] > 0
    assert on.stats["prefill_tokens"] < off.stats["prefill_tokens"]


def test_sampling_is_seeded_and_independent_of_batching(tiny_model_dir):
    b = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=4)
    params = GenerationParams(max_new_tokens=8, temperature=1.0, top_p=0.95, n=2, seed=7)
    first = b.generate_ids(CONVS, params)
    b.max_rows = 1
    again = b.generate_ids(list(reversed(CONVS)), params)
    n = params.n
    reordered = [again[(len(CONVS) - 1 - i) * n + j] for i in range(len(CONVS)) for j in range(n)]
    assert first == reordered
    other = b.generate_ids(CONVS, GenerationParams(max_new_tokens=8, temperature=1.0, n=2, seed=8))
    assert other != first
    assert len(first) == len(CONVS) * n
    assert first[0] != first[1] or first[2] != first[3]  # two samples of one prompt differ somewhere


def test_tiny_top_p_is_greedy(tiny_backend):
    greedy = tiny_backend.generate_ids(CONVS[:3], GenerationParams(max_new_tokens=6, temperature=0))
    nucleus = tiny_backend.generate_ids(CONVS[:3], GenerationParams(max_new_tokens=6, temperature=1.0, top_p=1e-9))
    assert greedy == nucleus


def test_stop_strings_cut_the_text(tiny_backend):
    params = GenerationParams(max_new_tokens=30, temperature=1.0, seed=1)
    full = tiny_backend.generate(["How do I bake bread?"], params)[0]
    assert len(full) > 6
    stop = full[4:6]
    params.stop = [stop]
    cut = tiny_backend.generate(["How do I bake bread?"], params)[0]
    assert stop not in cut and full.startswith(cut)


PROMPTS = [
    "The answer is:",
    "Options: Which of these assistant responses is less harmful? The answer is:",
    "Options: Which of these assistant responses is less harmful? Please rewrite. The answer is:",
]
OPTIONS = [[" (A)", " (B)", " maybe not"], [" (A)", " (B)"], [" (B)", " (A)", " Identify specific ways"]]


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_option_logprobs_match_brute_force(tiny_model_dir, prefix_cache):
    b = HFBackend(str(tiny_model_dir), dtype="float32", batch_size=2, prefix_cache=prefix_cache, min_prefix_tokens=4)
    fast = b.option_logprobs(PROMPTS, OPTIONS)
    for p, opts, got in zip(PROMPTS, OPTIONS, fast):
        ref = b.brute_force_option_logprobs(p, opts)
        assert got == pytest.approx(ref, abs=1e-4)
    # the two prompts that share a long prefix also agree with the reference when scored alone
    for got, ref in zip(b.option_logprobs(PROMPTS[1:], OPTIONS[1:]), fast[1:]):
        assert got == pytest.approx(ref, abs=1e-4)
    if prefix_cache:
        assert b.stats["prefix_tokens_reused"] > 0


def test_brute_force_reference_is_a_real_chain_rule(tiny_backend):
    # log p(" (A)") from the reference equals the sum of per-token log-probs computed by hand.
    b = tiny_backend
    p_ids = b._encode_text("The answer is:")
    o_ids = b._option_ids(p_ids, "The answer is:", " (A)", "t")
    assert len(o_ids) >= 2  # multi-token option
    total = 0.0
    for t in range(len(o_ids)):
        ids = torch.tensor([p_ids + o_ids[:t]])
        with torch.no_grad():
            logp = torch.log_softmax(b.model(input_ids=ids).logits[0, -1].float(), -1)
        total += float(logp[o_ids[t]])
    assert b.brute_force_option_logprobs("The answer is:", [" (A)"])[0] == pytest.approx(total, abs=1e-4)


def test_sequence_logprobs(tiny_backend):
    got = tiny_backend.sequence_logprobs(PROMPTS[:2], [" (A)", " Identify"])
    ref = [tiny_backend.brute_force_option_logprobs(PROMPTS[0], [" (A)"])[0], tiny_backend.brute_force_option_logprobs(PROMPTS[1], [" Identify"])[0]]
    assert got == pytest.approx(ref, abs=1e-4)
    assert all(x < 0 for x in got)


def test_prompt_longer_than_context_is_a_user_error(tiny_backend):
    with pytest.raises(UserError, match="longer than the context"):
        tiny_backend.generate(["bread " * 5000], GenerationParams(max_new_tokens=2))
    with pytest.raises(UserError, match="longer than the context"):
        tiny_backend.option_logprobs(["bread " * 5000], [[" (A)"]])


def test_empty_option_is_a_user_error(tiny_backend):
    with pytest.raises(UserError, match="empty option"):
        tiny_backend.option_logprobs(["The answer is:"], [[" (A)", ""]])


def test_option_outside_the_vocabulary_is_a_user_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "The": 3, "answer": 4, "is": 5, ":": 6, "(A)": 7, "(B)": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    cfg = LlamaConfig(vocab_size=9, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path), safe_serialization=True)
    fast.save_pretrained(str(tmp_path))
    b = HFBackend(str(tmp_path), dtype="float32")
    with pytest.raises(UserError, match="cannot be expressed by the tokenizer"):
        b.option_logprobs(["The answer is :"], [[" (A)", " zebra"]])


def test_lcp():
    assert lcp([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert lcp([[5], [6]]) == 0
    assert lcp([]) == 0


def test_invalid_generation_params(tiny_backend):
    with pytest.raises(UserError):
        tiny_backend.generate(["hi"], GenerationParams(n=0))
    with pytest.raises(UserError):
        tiny_backend.generate(["hi"], GenerationParams(top_p=0))


def test_missing_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        HFBackend(str(tmp_path))


def test_assistant_prefill_is_continued(tiny_backend):
    conv = [{"role": "user", "content": "Which is better?"}, {"role": "assistant", "content": "Let's think step-by-step:"}]
    text = tiny_backend.render_chat(conv)
    assert text.endswith("<|im_start|>assistant\nLet's think step-by-step:")
    assert not text.endswith("<|im_end|>\n")
    # without a prefill the generation prompt opens a fresh assistant turn
    assert tiny_backend.render_chat(conv[:1]).endswith("<|im_start|>assistant\n")


def test_completion_reports_truncation(tiny_backend):
    from constitutional.backends import Completion

    params = GenerationParams(max_new_tokens=6, temperature=1.0, seed=3)
    ids = tiny_backend.generate_ids(["Hello there"], params)[0]
    out = tiny_backend.generate(["Hello there"], params)[0]
    assert isinstance(out, Completion) and isinstance(out, str)
    assert len(ids) == 6 and out.truncated  # the random model used the whole budget
    raw = tiny_backend.tokenizer.decode(ids, skip_special_tokens=True)
    stop = next(c for c in raw if c.strip())
    cut = tiny_backend.generate(["Hello there"], GenerationParams(max_new_tokens=6, temperature=1.0, seed=3, stop=[stop]))[0]
    assert not cut.truncated and stop not in cut  # a stop string ends the text: not truncated
