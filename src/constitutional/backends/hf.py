"""The `hf` backend: local transformers models on CPU or GPU, with our own batched decode loop
(docs/ARCHITECTURE.md "Model backends").

Why not `model.generate`: on a CPU the prefill of long few-shot prompts costs more than decoding,
and every critique and label prompt starts with the same few-shot block. The backend is one class,
`HFBackend`, with one concept per module:

- this module: loading (safetensors only, never `trust_remote_code`; bf16 where the hardware has it
  with `dtype="auto"`, float32 otherwise or on request), chat encoding, and generation's entry
  points (`generate`, `generate_ids`, `schedule`);
- `hf_cache.py`: the shared-prefix KV cache (`prefix_cache=True`) and the prefill layout
  `[shared prefix][left padding][own suffix]`;
- `hf_decode.py`: the decode loop, one running batch that takes a waiting row as soon as one
  finishes (continuous batching);
- `hf_sampling.py`: one step's token choice, each row with its own seeded generator (results do not
  depend on batch composition or order);
- `hf_static.py`: the static-cache, compiled decode path for GPUs (`static_cache`, `compile`);
- `hf_score.py`: `option_logprobs` / `sequence_logprobs`, all options of a prompt in one forward.

Departures: no beam search; the repetition penalty is CTRL-style over the generated tokens only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from .base import Completion, Conversation, GenerationParams, Request, as_messages, cut_at_stop, render_messages, run_waves
from .hf_cache import PrefixCache, default_token_budget, prefix_cache_tokens
from .hf_cascade import MIN_PREFIX as CASCADE_MIN_PREFIX
from .hf_cascade import supported as cascade_supported
from .hf_sampling import Sampling
from .hf_score import Scoring
from .hf_static import StaticDecode, static_cache_supported, static_options


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "float32":
        return torch.float32
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float16":
        return torch.float16
    if dtype != "auto":
        raise UserError(f"dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


class HFBackend(PrefixCache, Sampling, StaticDecode, Scoring):
    """Local transformers causal LM behind the backend protocol (see `base.py`; its parts in the module docstring)."""

    def __init__(
        self,
        model: str,
        name: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        prefix_cache: bool = True,
        min_prefix_tokens: int = 16,
        system_prompt: str | None = None,
        static_cache: str | None = None,
        compile: str | None = None,
        token_budget: int = 0,
        max_rows: int = 64,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._configure(name or model, model, device, batch_size, prefix_cache, min_prefix_tokens, system_prompt)
        self._token_budget, self.max_rows = token_budget, max(1, int(max_rows))
        self.dtype = resolve_dtype(dtype, self.device)
        local = Path(model).expanduser()
        if not local.exists() and (model.startswith(("/", ".", "~")) or model.count("/") > 1):
            raise UserError(f"model {model!r}: no such model directory; check the path, or use `embedded`, a hub id, or openai:URL#model")
        if local.exists() and not (local / "config.json").is_file():
            raise UserError(f"model {model!r}: directory has no config.json; point to a transformers model directory")
        static, compiled = static_options(static_cache, compile)  # bad values fail before loading
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
            loaded = AutoModelForCausalLM.from_pretrained(
                model, dtype=self.dtype, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError, EnvironmentError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"model {model!r}: cannot load it ({first[:200]}); use `embedded`, a local model directory with "
                "safetensors weights, a reachable hub id, or openai:URL#model"
            ) from None
        self._attach(loaded, tokenizer, static, compiled)

    @classmethod
    def from_model(cls, model, tokenizer, name: str = "in-memory", device: str | None = None, **options) -> "HFBackend":
        """A backend around an already loaded model and tokenizer (benchmarks, tests): no loading, the
        model keeps its dtype and, unless `device` is given, its device. Options as for the constructor
        (batch_size, prefix_cache, min_prefix_tokens, system_prompt, static_cache, compile)."""
        self = cls.__new__(cls)
        static_cache, compile = options.pop("static_cache", None), options.pop("compile", None)
        self._token_budget, self.max_rows = options.pop("token_budget", 0), max(1, int(options.pop("max_rows", 64)))
        unknown = set(options) - {"batch_size", "prefix_cache", "min_prefix_tokens", "system_prompt"}
        if unknown:
            raise TypeError(f"from_model: unknown options {sorted(unknown)}")
        dev = device or str(next(model.parameters()).device)
        self._configure(name, getattr(model, "name_or_path", name), dev, options.get("batch_size", 16), options.get("prefix_cache", True),
                        options.get("min_prefix_tokens", 16), options.get("system_prompt"))
        self.dtype = next(model.parameters()).dtype
        static, compiled = static_options(static_cache, compile)
        self._attach(model, tokenizer, static, compiled)
        return self

    def _configure(self, name, path, device, batch_size, prefix_cache, min_prefix_tokens, system_prompt) -> None:
        self.name = name
        self.path = path
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.batch_size = max(1, int(batch_size))
        self.prefix_cache = prefix_cache
        self.min_prefix_tokens = min_prefix_tokens
        # None keeps the chat template's own default system prompt (SmolLM2 injects one);
        # a string replaces it for conversations that carry no system message.
        self.system_prompt = system_prompt

    def _attach(self, model, tokenizer, static: str, compiled: str) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.model.to(self.device).eval()
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else next(iter(self.eos_ids), 0))
        self._prefix_kv: OrderedDict[tuple, object] = OrderedDict()
        self.stats = {"prefill_tokens": 0, "prefix_tokens_reused": 0, "generated_tokens": 0, "decode_steps": 0, "decode_rows": 0, "prompts_kept": 0}
        self.token_budget = self._token_budget or default_token_budget(self.model.config, self.dtype, self.device)
        # the shared prefix's KV cache read once by all rows that share it (hf_cascade), where the model allows
        self.cascade_ok = self.prefix_cache and cascade_supported(self.model)
        self.cascade_min_prefix = CASCADE_MIN_PREFIX
        self.prefix_cache_tokens = prefix_cache_tokens(self.model.config, self.dtype)
        # static cache + compiled decode (see the module docstring); "auto" means on with CUDA
        supported = static_cache_supported(self.model.config)
        if static == "on" and not supported:
            raise UserError(
                f"static_cache=on: {self.name} has attention layers the static decode path does not handle "
                "(sliding-window or non-attention layers); use static_cache=off"
            )
        self.use_static_cache = supported and (static == "on" or (static == "auto" and self.device.type == "cuda"))
        self.use_compile = self.use_static_cache and (compiled == "on" or (compiled == "auto" and self.device.type == "cuda"))
        self._decode_fn = None  # the (compiled) decode step, built on first use
        self._static_ok = False  # set once a static batch went through
        self._static: OrderedDict[tuple[int, int], object] = OrderedDict()  # (rows, cache length) -> StaticCache

    # ---------------------------------------------------------------- encoding
    def render_chat(self, conversation: Conversation, add_generation_prompt: bool = True) -> str:
        messages = as_messages(conversation)
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return render_messages(self.tokenizer, messages, add_generation_prompt)

    def _encode_chat(self, conversation: Conversation) -> list[int]:
        return self.tokenizer(self.render_chat(conversation), add_special_tokens=False)["input_ids"]

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def _check_length(self, ids: Sequence[int], index: int, what: str = "prompt") -> None:
        if len(ids) >= self.max_positions:
            raise UserError(
                f"{what} {index} is {len(ids)} tokens, longer than the context of {self.name} "
                f"({self.max_positions} tokens); shorten it or use a model with a longer context"
            )

    # ---------------------------------------------------------------- generation
    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        return [self._completion(ids, ended, params) for ids, ended in self._generate(conversations, params)]

    def generate_ids(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[list[int]]:
        """Generated token ids (without the eos token), `len(conversations) * n` lists."""
        return [ids for ids, _ in self._generate(conversations, params)]

    def _completion(self, ids: list[int], ended: bool, params: GenerationParams) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = cut_at_stop(text, params.stop)
        return Completion(cut.strip(), truncated=not ended and cut == text)

    def schedule(self, requests, on_done) -> None:
        """Generate every request of `requests` (an iterable of `base.Request`) in one running batch
        (continuous batching, `hf_decode.py`); `on_done(request, completions)` is called as each
        request's samples are all done, and the requests it returns join the queue."""
        if self.use_static_cache:  # fixed-shape batches (GPU fast path): requests go in waves
            return run_waves(self, requests, on_done)
        self._decoder().run(requests, lambda req, outs: on_done(req, [self._completion(i, e, req.params) for i, e in outs]))

    def _decoder(self):
        from .hf_decode import ContinuousDecoder

        return ContinuousDecoder(self, token_budget=self.token_budget, max_rows=self.max_rows)

    @torch.no_grad()
    def _generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[tuple[list[int], bool]]:
        """(token ids, ended) per sample; ended is False when max_new_tokens or the context ran out."""
        params.check()
        n = params.n
        outputs: list[tuple[list[int], bool]] = [([], True)] * (len(conversations) * n)
        if not conversations:
            return outputs
        if self.use_static_cache:
            encoded = [self._encode_chat(c) for c in conversations]
            for i, ids in enumerate(encoded):
                self._check_length(ids, i)
            done = self._generate_static(encoded, params, outputs)
            if done:
                return outputs
        requests = [Request(c, params, key=i) for i, c in enumerate(conversations)]

        def collect(req, outs):
            outputs[req.key * n : (req.key + 1) * n] = outs

        self._decoder().run(requests, collect)
        return outputs

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
