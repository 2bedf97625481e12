"""The `hf` backend: local transformers models on CPU or GPU, with our own batched decode loop.

Why not `model.generate`: on a CPU the prefill of long few-shot prompts costs more than decoding,
and every critique and label prompt starts with the same few-shot block. This backend

- encodes the longest token prefix that prompts share once and reuses its KV cache for every row
  that starts with it (`prefix_cache=True`; `_prefix_for`); a new row is prefilled as
  `[shared prefix][left padding][own suffix]`, with explicit position ids so the padding in the
  middle is invisible to the model;
- decodes every request of a call (or of a `schedule` queue) in one running batch that takes a
  waiting row as soon as one finishes (continuous batching, `hf_decode.py`);
- samples each row with its own generator seeded from (seed, prompt, sample index), so results do
  not depend on batch composition or order (reproducible with a seed, also after a resume);
- scores all options of a multiple-choice prompt in one forward pass (`option_logprobs`): the
  options are appended after the prompt and a 4D attention mask lets each option see the prompt and
  its own earlier tokens only (a "tree" of continuations sharing the prompt's positions).

Weights load from safetensors only and never with `trust_remote_code`. bf16 is used where the
hardware supports it (`dtype="auto"`), float32 otherwise or on request.
Departures: no beam search; the repetition penalty is CTRL-style over the generated tokens only.

Static-cache fast path (`static_cache`, default on with CUDA; `compile`, default on with it on CUDA;
the environment variables CAI_STATIC_CACHE / CAI_COMPILE give the defaults). On a GPU the dynamic
loop above is bound by per-step overhead (Python, kernel launches, growing caches), so
`_generate_batch_static` keeps every shape fixed for the whole decode: a transformers `StaticCache`
of P + L + max_new slots rounded up to a multiple of 256, a batch padded to the next power of two
(at most `batch_size`) with ignored dummy rows, finished rows kept and fed padding instead of being
dropped, and a preallocated (rows, cache length) attention mask updated in place. The shared prefix
is copied from the prefix KV cache into the first P slots of every row; the prefill is one eager
forward with the same 4D mask as the dynamic path, sized to the cache. Each decode step is one call
of `model.forward` compiled once per backend: `torch.compile(mode="reduce-overhead",
fullgraph=True)` (CUDA graphs) on CUDA, plain inductor on CPU with `compile="on"`. Sampling, seeds,
the repetition penalty, eos/stop handling and the counters are those of the dynamic path.
Verified here on CPU only (float32 tiny Llama, eager and compiled: token-identical to the dynamic
path, greedy and seeded sampling); not yet verified on a GPU.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from .base import Completion, Conversation, GenerationParams, Request, as_messages, cut_at_stop, render_messages, run_waves


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


def _lcp(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    if not seqs:
        return 0
    return min(_lcp2(seqs[0], s) for s in seqs)


def _lcp2(a: Sequence[int], b: Sequence[int]) -> int:
    """`_lcp` of two sequences by binary search on slice equality (C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _row_seed(seed: int, ids: Sequence[int], sample: int) -> int:
    h = hashlib.sha256(f"{seed}:{sample}:".encode() + bytes(str(list(ids)), "utf-8")).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


class HFBackend:
    """Local transformers causal LM behind the backend protocol (see `base.py`)."""

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
        static, compiled = _static_options(static_cache, compile)  # bad values fail before loading
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
        static, compiled = _static_options(static_cache, compile)
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
        self.stats = {"prefill_tokens": 0, "prefix_tokens_reused": 0, "generated_tokens": 0, "decode_steps": 0, "decode_rows": 0}
        self.token_budget = self._token_budget or _default_token_budget(self.model.config, self.dtype, self.device)
        # static cache + compiled decode (see the module docstring); "auto" means on with CUDA
        supported = _static_cache_supported(self.model.config)
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

    # ---------------------------------------------------------------- shared prefix
    def _split_prefix(self, seqs: Sequence[Sequence[int]]) -> int:
        """How many leading tokens all `seqs` share and will be encoded once (0 when not worth it)."""
        if not self.prefix_cache or len(seqs) < 2:
            return 0
        p = min(_lcp(seqs), min(len(s) for s in seqs) - 1)  # every row keeps >= 1 own token
        return p if p >= self.min_prefix_tokens else 0

    @torch.no_grad()
    def _prefix_cache(self, prefix: tuple[int, ...]):
        """KV cache of `prefix` (batch 1), computed once and kept in a small LRU."""
        hit = self._prefix_kv.get(prefix)
        if hit is not None:
            self._prefix_kv.move_to_end(prefix)
            return hit
        ids = torch.tensor([prefix], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.stats["prefill_tokens"] += len(prefix)
        self._prefix_kv[prefix] = out.cache
        while len(self._prefix_kv) > 4:
            self._prefix_kv.popitem(last=False)
        return out.cache

    def _batch_cache(self, prefix: tuple[int, ...], batch: int):
        if not prefix:
            return None
        self.stats["prefix_tokens_reused"] += len(prefix) * batch
        cache = copy.deepcopy(self._prefix_cache(prefix))
        cache.batch_repeat_interleave(batch)
        return cache

    def _masked_forward(self, prefix: tuple[int, ...], input_ids, allowed, position_ids, use_cache: bool, **kwargs):
        """Forward `input_ids` (B, T) after the cached `prefix` with a custom attention pattern.

        allowed: (B, T, P + T) bool, True where a query may attend to a key; it becomes the
        additive 4D mask (0 / dtype-min) that transformers passes to attention as given.
        """
        B = input_ids.shape[0]
        mask = _additive_mask(allowed, self.dtype)
        cache = self._batch_cache(prefix, B)
        return self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=position_ids.to(self.device),
            cache=cache,
            use_cache=use_cache,
            **kwargs,
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

    def _prefix_for(self, ids: Sequence[int], pool: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """The shared prefix a prompt is prefilled after: the longest cached prefix it starts with, or a
        new one when the prompts waiting beside it (`pool`) share a longer one (by 64+ tokens); () when
        neither reaches `min_prefix_tokens`. Every prompt keeps at least one token of its own."""
        if not self.prefix_cache:
            return ()
        best = ()
        for prefix in self._prefix_kv:
            if len(best) < len(prefix) < len(ids) and tuple(ids[: len(prefix)]) == prefix:
                best = prefix
        shared = max((_lcp2(ids, other) for other in pool if other != ids), default=0)
        shared = min(shared, len(ids) - 1)
        if shared >= self.min_prefix_tokens and shared >= len(best) + 64:
            return tuple(ids[:shared])
        return best if len(best) >= self.min_prefix_tokens else ()

    def _generate_static(self, encoded, params: GenerationParams, outputs) -> bool:
        """The static-cache path (fixed-shape batches, sorted by length): fills `outputs`; False when
        the first static batch failed and the backend fell back to the dynamic path."""
        requests = [(i * params.n + j, ids, _row_seed(params.seed, ids, j)) for i, ids in enumerate(encoded) for j in range(params.n)]
        p = self._split_prefix(encoded)
        prefix = tuple(encoded[0][:p])
        order = sorted(requests, key=lambda r: -len(r[1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if not self._static_ok:
                try:  # the first batch shows whether this model/device/torch can take the static path
                    result = self._generate_batch_static(prefix, batch, params)
                    self._static_ok = True
                except Exception as e:  # noqa: BLE001 (compile/graph failures come in many types)
                    print(f"[hf] static-cache decode failed on {self.name} ({type(e).__name__}: {str(e)[:160]}); "
                          "using the dynamic path (set CAI_STATIC_CACHE=off to skip the attempt)", file=sys.stderr)
                    self.use_static_cache = self.use_compile = False
                    self._static.clear()
                    return False
            else:
                result = self._generate_batch_static(prefix, batch, params)
            for (slot, _, _), out in zip(batch, result):
                outputs[slot] = out
        return True

    # ---------------------------------------------------------------- static-cache decode
    def _static_rows(self, batch: int) -> int:
        """Rows of the static batch: the next power of two, at most `batch_size` (never fewer than `batch`)."""
        rows = 1 << max(0, batch - 1).bit_length()
        return max(batch, min(rows, self.batch_size))

    def _static_cache(self, rows: int, length: int):
        """A reset StaticCache of `rows` x `length` slots. A few are kept (LRU) and reused: a reused cache
        keeps its tensor addresses, so the CUDA graph captured for its shape replays without re-recording."""
        from transformers import StaticCache

        key = (rows, length)
        cache = self._static.pop(key, None)
        if cache is not None:
            self._static[key] = cache
            cache.reset()
            return cache
        while len(self._static) >= 4 or (self._static and not self._room_for(rows, length)):
            self._static.popitem(last=False)  # free old caches before the new one is allocated (lazily, at prefill)
        cache = StaticCache(config=self.model.config, max_cache_len=length)
        self._static[key] = cache
        return cache

    def _room_for(self, rows: int, length: int) -> bool:
        """Whether a new static cache fits in free GPU memory twice over (else the kept ones are dropped)."""
        if self.device.type != "cuda":
            return True
        need = rows * length * kv_bytes_per_token(self.model.config, self.dtype)
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free > 2 * need

    def _decode_step(self):
        """The decode forward: the model, or `model.forward` compiled once per backend when `compile` is on."""
        if self._decode_fn is None:
            if not self.use_compile:
                self._decode_fn = self.model
            else:
                import torch._dynamo

                # every (rows, cache length) shape is one graph; the default limit of 8 would fall back to eager
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                if self.device.type == "cuda":
                    self._decode_fn = torch.compile(self.model.forward, mode="reduce-overhead", fullgraph=True, dynamic=False)
                else:
                    self._decode_fn = torch.compile(self.model.forward, fullgraph=True, dynamic=False)
        return self._decode_fn

    def _generate_batch_static(self, prefix: tuple[int, ...], batch, params: GenerationParams) -> list[tuple[list[int], bool]]:
        """One batch with fixed shapes: StaticCache, padded batch, finished rows kept (see the module docstring)."""
        dev, P, B = self.device, len(prefix), len(batch)
        R = self._static_rows(B)
        suffixes = [ids[P:] for _, ids, _ in batch]
        L = max(len(s) for s in suffixes)
        limit = [min(params.max_new_tokens, self.max_positions - len(ids)) for _, ids, _ in batch]  # each row's room
        max_new = max(limit)
        C = -(-(P + L + max_new) // 256) * 256  # cache slots, rounded so that graphs are reused across batches
        rows = suffixes + [suffixes[-1]] * (R - B)  # dummy rows repeat a real one and are ignored
        # keys: all C slots; those past P + L are not written yet (the decode fills them)
        input_ids, valid, pos, allowed = _prefill_layout(rows, P, C, self.pad_id)
        mask = _additive_mask(allowed, self.dtype)
        cache = self._static_cache(R, C)
        if P:
            for i, layer in enumerate(self._prefix_cache(prefix).layers):  # the prefix fills slots [0, P) of every row
                k, v = layer.keys, layer.values
                cache.update(k.expand(R, *k.shape[1:]), v.expand(R, *v.shape[1:]), i)
            self.stats["prefix_tokens_reused"] += P * B
        out = self.model(
            input_ids=input_ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos[:, P:].to(dev),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats["prefill_tokens"] += int(sum(len(s) for s in suffixes))
        logits = out.logits[:, -1, :].float()
        del out, mask, allowed
        gens = [torch.Generator().manual_seed(seed) for _, _, seed in batch]
        generated: list[list[int]] = [[] for _ in range(B)]
        ended = [False] * B  # stopped by eos or a stop string
        active = list(range(B))  # real rows still generating
        # fixed-shape decode inputs, updated in place
        attn = valid.long().to(dev)
        next_pos = (pos[:, -1:] + 1).to(dev)
        step_ids = torch.full((R, 1), self.pad_id, dtype=torch.long, device=dev)
        decode = self._decode_step()
        graphs = self.use_compile and dev.type == "cuda"
        for step in range(max_new):
            rows_logits = logits if len(active) == R else logits[torch.tensor(active, device=logits.device)]
            tokens, keep = self._step(rows_logits, active, generated, ended, gens, params)
            keep = [k for k in keep if len(generated[active[k]]) < limit[active[k]]]
            if not keep:
                break
            active = [active[k] for k in keep]
            feed = torch.full((R,), self.pad_id, dtype=torch.long)  # finished and dummy rows decode padding
            feed[torch.tensor(active)] = tokens[torch.tensor(keep)]
            step_ids.copy_(feed[:, None])
            attn[:, P + L + step] = 1  # the slot this step writes
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = decode(input_ids=step_ids, attention_mask=attn, position_ids=next_pos, cache=cache, use_cache=True)
            # a copy: CUDA-graph outputs are overwritten by the next replay (and .float() of fp32 is no copy)
            logits = out.logits[:, -1, :].to(torch.float32, copy=True)
            next_pos += 1
        return list(zip(generated, ended))

    def _step(self, logits, active: list[int], generated: list[list[int]], ended: list[bool], gens, params: GenerationParams):
        """One decode step's bookkeeping, shared by both decode paths: penalise repeats, sample a token
        for each active row (logits: one row per active row), record it or mark the row ended (eos or
        a stop string). Returns (tokens, keep: positions in `active` of the rows still generating)."""
        if params.repetition_penalty != 1.0:
            logits = _penalise_repeats(logits, [generated[r] for r in active], params.repetition_penalty)
        tokens = self._sample(logits, [gens[r] for r in active], params)
        keep = []
        for k, r in enumerate(active):
            t = int(tokens[k])
            if t in self.eos_ids:
                ended[r] = True
                continue
            generated[r].append(t)
            if params.stop and self._hit_stop(generated[r], params.stop):
                ended[r] = True
                continue
            keep.append(k)
        self.stats["generated_tokens"] += len(active)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(active)
        return tokens, keep

    def _hit_stop(self, ids: list[int], stops: list[str]) -> bool:
        tail = self.tokenizer.decode(ids[-32:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    @staticmethod
    def _sample(logits: torch.Tensor, gens: list[torch.Generator], params: GenerationParams) -> torch.Tensor:
        """One token per row. logits: (rows, vocab) float32 on the model device."""
        if params.temperature == 0:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits / params.temperature, dim=-1).cpu()
        if params.top_p < 1.0:
            sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
            cum = sorted_p.cumsum(-1)
            drop = cum - sorted_p > params.top_p  # keep the smallest set whose mass reaches top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
        return torch.stack([torch.multinomial(probs[k], 1, generator=g)[0] for k, g in enumerate(gens)])

    # ---------------------------------------------------------------- scoring
    def _option_ids(self, prompt_ids: list[int], prompt: str, option: str, where: str) -> list[int]:
        """Token ids of `option` as a continuation of `prompt`, checked to round-trip."""
        if not option:
            raise UserError(f"{where}: empty option string; options must contain text")
        full = self._encode_text(prompt + option)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            ids = full[len(prompt_ids) :]
        else:  # the tokenizer merged across the boundary: score the option's own tokens
            ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        decoded = self.tokenizer.decode(ids, skip_special_tokens=False)
        if not ids or (unk is not None and unk in ids and self.tokenizer.unk_token not in option) or decoded.strip() != option.strip():
            raise UserError(
                f"{where}: option {option!r} cannot be expressed by the tokenizer of {self.name} "
                f"(it round-trips to {decoded!r}); use options made of characters the tokenizer knows"
            )
        return ids

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """log p(option | prompt) summed over the option's tokens, for every option of every prompt.

        prompts: N raw-text prompts; options: N lists of option strings. One forward per prompt
        (batched): [prompt][option 1]...[option k] with a tree attention mask.
        """
        if len(prompts) != len(options):
            raise ValueError("prompts and options differ in length")
        rows = []
        for i, (prompt, opts) in enumerate(zip(prompts, options)):
            if not opts:
                raise UserError(f"prompt {i}: no options to score")
            p_ids = self._encode_text(prompt)
            o_ids = [self._option_ids(p_ids, prompt, o, f"prompt {i} option {j}") for j, o in enumerate(opts)]
            self._check_length(p_ids + [t for o in o_ids for t in o], i, "prompt with its options")
            rows.append((i, p_ids, o_ids))
        results: list[list[float]] = [[] for _ in prompts]
        if not rows:
            return results
        p = self._split_prefix([r[1] for r in rows])
        prefix = tuple(rows[0][1][:p])
        order = sorted(rows, key=lambda r: -(len(r[1]) + sum(len(o) for o in r[2])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for (i, _, _), scores in zip(batch, self._score_batch(prefix, batch)):
                results[i] = scores
        return results

    def sequence_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log p(continuation | prompt) in nats, one per pair."""
        return [s[0] for s in self.option_logprobs(prompts, [[c] for c in continuations])]

    def _score_batch(self, prefix: tuple[int, ...], batch) -> list[list[float]]:
        P, B = len(prefix), len(batch)
        seqs, positions, trees = [], [], []
        for _, p_ids, o_ids in batch:
            own = list(p_ids[P:])
            n = len(own)
            seq, pos, group = own[:], list(range(P, P + n)), [-1] * n
            for k, o in enumerate(o_ids):
                seq += o
                pos += list(range(P + n, P + n + len(o)))
                group += [k] * len(o)
            seqs.append(seq)
            positions.append(pos)
            trees.append((n, group, o_ids))
        T = max(len(s) for s in seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        allowed = torch.zeros((B, T, P + T), dtype=torch.bool)
        allowed[:, :, :P] = True
        for r, (seq, pos, (n, group, _)) in enumerate(zip(seqs, positions, trees)):
            m = len(seq)
            input_ids[r, :m] = torch.tensor(seq)
            position_ids[r, :m] = torch.tensor(pos)
            g = torch.tensor(group)
            idx = torch.arange(m)
            causal = idx[None, :] <= idx[:, None]
            # prompt keys are visible to everyone; option keys only to later tokens of the same option
            same = (g[None, :] == -1) | (g[None, :] == g[:, None])
            allowed[r, :m, P : P + m] = causal & same
            allowed[r, m:, P:] = torch.eye(T, dtype=torch.bool)[m:]  # padding rows see themselves
        # Logits only where an option token is predicted: the last prompt token and each option's
        # tokens but its last (the full (B, T, vocab) tensor would be GBs for long prompts).
        preds = []
        for n, _, o_ids in trees:
            if n == 0:
                raise RuntimeError("prompt suffix is empty; _split_prefix keeps one token per row")
            row, start = [], n
            for o in o_ids:
                row.append([n - 1] + list(range(start, start + len(o) - 1)))
                start += len(o)
            preds.append(row)
        keep = sorted({q for row in preds for opt in row for q in opt})
        col = {q: k for k, q in enumerate(keep)}
        # scoring reads the prefix cache but needs no new one
        keep_t = torch.tensor(keep, device=self.device)
        out = self._masked_forward(prefix, input_ids, allowed, position_ids, use_cache=False, logits_to_keep=keep_t)
        self.stats["prefill_tokens"] += int(sum(len(s) for s in seqs))
        logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        return [
            [float(sum(logp[r, col[q], t] for q, t in zip(opt_preds, o))) for opt_preds, o in zip(row, o_ids)]
            for r, (row, (_, _, o_ids)) in enumerate(zip(preds, trees))
        ]

    def brute_force_option_logprobs(self, prompt: str, options: Sequence[str]) -> list[float]:
        """Reference for tests: each option scored in its own plain forward pass, no cache, no mask tricks."""
        p_ids = self._encode_text(prompt)
        out = []
        for j, o in enumerate(options):
            o_ids = self._option_ids(p_ids, prompt, o, f"option {j}")
            ids = torch.tensor([p_ids + o_ids], device=self.device)
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)[0].cpu()
            out.append(float(sum(logp[len(p_ids) - 1 + t, tok] for t, tok in enumerate(o_ids))))
        return out


def _prefill_layout(suffixes: Sequence[Sequence[int]], P: int, keys: int, pad_id: int):
    """A prefill batch laid out as `[shared prefix (P)][left padding][own suffix]` after the cached
    prefix. Returns input ids (rows, L); `valid` (rows, keys), True at the prefix and each row's own
    tokens (key slots past P + L stay False: the decode fills them); position ids of the P + L slots
    (rows, P + L), counting real tokens only, so the padding takes no position; and the attention
    pattern (rows, L, keys): causal, real keys only, and every query sees itself (a padding query
    with no visible key would produce NaNs that leak through its values)."""
    R, L = len(suffixes), max(len(s) for s in suffixes)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    valid = torch.zeros((R, keys), dtype=torch.bool)
    valid[:, :P] = True
    for r, s in enumerate(suffixes):
        input_ids[r, L - len(s) :] = torch.tensor(s)
        valid[r, P + L - len(s) : P + L] = True
    pos = (valid[:, : P + L].long().cumsum(-1) - 1).clamp(min=0)
    q_idx = torch.arange(L)[:, None] + P
    k_idx = torch.arange(keys)[None, :]
    allowed = (k_idx <= q_idx)[None] & valid[:, None, :]
    allowed |= (k_idx == q_idx)[None]
    return input_ids, valid, pos, allowed


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, T, keys) bool -> the 4D additive mask (0 / dtype-min) transformers passes to attention as given."""
    mask = torch.zeros((allowed.shape[0], 1, *allowed.shape[1:]), dtype=dtype)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a model's KV cache."""
    cfg = config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def kv_bytes_per_token(config, dtype) -> int:
    """Bytes of KV cache one token takes in every layer of a model (keys and values)."""
    layers, heads, head_dim = kv_shape(config)
    return 2 * layers * heads * head_dim * torch.finfo(dtype).bits // 8


def _default_token_budget(config, dtype, device) -> int:
    """KV tokens (rows x columns) the running batch may hold: 1 GiB of KV on a CPU (what keeps a
    whole run within a few GB), half the free memory on a GPU; CAI_KV_MEMORY_MB sets the bytes."""
    mb = os.environ.get("CAI_KV_MEMORY_MB")
    if mb:
        memory = float(mb) * 2**20
    elif device.type == "cuda":
        memory = torch.cuda.mem_get_info(device)[0] / 2
    else:
        memory = 2**30
    return max(256, int(memory // kv_bytes_per_token(config, dtype)))


def _static_options(static_cache, compile) -> tuple[str, str]:
    """Validated `static_cache` / `compile` settings ("auto", "on" or "off"); unset ones come from
    CAI_STATIC_CACHE / CAI_COMPILE, else "auto". `compile="on"` turns an "auto" static cache on."""
    out = []
    for what, env, value in (("static_cache", "CAI_STATIC_CACHE", static_cache), ("compile", "CAI_COMPILE", compile)):
        source = what
        if value is None:
            value, source = os.environ.get(env, "auto"), f"{env} (environment)"
        if isinstance(value, bool):
            value = "on" if value else "off"
        value = str(value).strip().lower()
        if value not in ("auto", "on", "off"):
            raise UserError(f"{source}={value!r}: use auto, on or off")
        out.append(value)
    static, compiled = out
    if compiled == "on":
        if static == "off":
            raise UserError("compile=on needs the static cache (it compiles the static decode step); set static_cache to auto or on")
        static = "on"
    return static, compiled


def _static_cache_supported(config) -> bool:
    """True when a StaticCache of this model has plain full-attention layers only (what the static path handles)."""
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        return all(type(layer) is StaticLayer for layer in StaticCache(config=config, max_cache_len=8).layers)
    except Exception:  # an exotic config: keep the dynamic path
        return False


def _penalise_repeats(logits: torch.Tensor, generated: list[list[int]], penalty: float) -> torch.Tensor:
    """logits: (rows, vocab); each row's already generated tokens get the repetition penalty."""
    logits = logits.clone()
    for k, ids in enumerate(generated):
        if ids:
            idx = torch.tensor(sorted(set(ids)), device=logits.device)
            vals = logits[k, idx]
            logits[k, idx] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
