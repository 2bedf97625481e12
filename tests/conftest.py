"""Shared fixtures: a tiny random Llama with a real (in-memory trained) byte-level BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub (CI has no network to it)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, knead, let it rise, and bake.",
    "The answer is: (A) (B) Options: Which of these assistant responses is less harmful?",
    "Identify specific ways in which the assistant's last response is harmful, unethical or illegal.",
    "Please rewrite the assistant response to remove any and all harmful content.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
] * 20


def make_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a random 2-layer Llama and its tokenizer to `path` (milliseconds; no downloads)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # keep <|endoftext|> and <|im_start|> from dominating a random model's output
        model.model.embed_tokens.weight[:2] = 0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    fast.save_pretrained(str(path))
    return path


def make_parrot_model(path: Path, phrase: str, seed: int = 0, steps: int = 60) -> Path:
    """The tiny Llama taught to answer every chat prompt with `phrase` (greedy), for tests that read
    a model's answer off a screen: a random model's greedy answer is blank or a repeated token.
    Under a second on one CPU thread."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model(path, seed=seed)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    answer = tok(phrase + "<|im_end|>", add_special_tokens=False)["input_ids"]
    seqs = []
    for prompt in ("How do I bake bread?", "Hello", "abc", "Tell me a joke."):
        ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        seqs.append((torch.tensor([ids + answer]), torch.tensor([[-100] * len(ids) + answer])))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only wait on each other
    try:
        for _ in range(steps):
            loss = sum(model(input_ids=x, labels=y).loss for x, y in seqs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def parrot_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two parrot models: one answers "Knead the dough well.", the other "The answer is (A)."."""
    root = tmp_path_factory.mktemp("parrots")
    return (make_parrot_model(root / "knead", "Knead the dough well.", seed=0),
            make_parrot_model(root / "answer", "The answer is (A).", seed=1))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from constitutional.backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir), dtype="float32", batch_size=4, min_prefix_tokens=4)


class ScriptedBackend:
    """The backend protocol with scripted answers, for tests of a stage's control flow.

    reply(messages, sample_index) -> str gives each generated text (a `Completion`; `truncated`
    is set when the text ends with "[cut]", which is removed); score(prompt, options) -> list of
    log-probabilities gives `option_logprobs`. Every call is recorded in `calls`.
    """

    name = "scripted"

    def __init__(self, reply=None, score=None):
        self.reply = reply or (lambda messages, j: f"answer {j}")
        self.score = score or (lambda prompt, options: [0.0 for _ in options])
        self.calls: list[tuple[str, object]] = []

    def generate(self, conversations, params):
        from constitutional.backends.base import Completion, as_messages

        out = []
        for conv in conversations:
            messages = as_messages(conv)
            self.calls.append(("generate", messages))
            for j in range(params.n):
                text = self.reply(messages, j)
                cut = text.endswith("[cut]")
                out.append(Completion(text[: -len("[cut]")].strip() if cut else text, truncated=cut))
        return out

    def option_logprobs(self, prompts, options):
        self.calls.append(("option_logprobs", list(prompts)))
        return [list(self.score(p, o)) for p, o in zip(prompts, options)]

    def sequence_logprobs(self, prompts, continuations):
        self.calls.append(("sequence_logprobs", list(prompts)))
        return [float(self.score(p, [c])[0]) for p, c in zip(prompts, continuations)]

    def render_chat(self, conversation, add_generation_prompt=True):
        from constitutional.backends.base import as_messages
        from constitutional.data.loaders import to_transcript

        messages = as_messages(conversation)
        prefill = add_generation_prompt and messages and messages[-1]["role"] == "assistant"
        return "\n\n" + to_transcript(messages) + ("\n\nAssistant:" if add_generation_prompt and not prefill else "")


@pytest.fixture
def scripted():
    """The `ScriptedBackend` class (build one per test with its own reply/score functions)."""
    return ScriptedBackend
