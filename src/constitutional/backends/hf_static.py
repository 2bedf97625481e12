"""The `hf` backend's static-cache fast path (`static_cache`, default on with CUDA; `compile`,
default on with it on CUDA; the environment variables CAI_STATIC_CACHE / CAI_COMPILE give the
defaults).

On a GPU the dynamic loop is bound by per-step overhead (Python, kernel launches, growing caches),
so `_generate_batch_static` keeps every shape fixed for the whole decode: a transformers
`StaticCache` of P + L + max_new slots rounded up to a multiple of 256, a batch padded to the next
power of two (at most `batch_size`) with ignored dummy rows, finished rows kept and fed padding
instead of being dropped, and a preallocated (rows, cache length) attention mask updated in place.
The shared prefix is copied from the prefix KV cache into the first P slots of every row; the
prefill is one eager forward with the same 4D mask as the dynamic path, sized to the cache. Each
decode step is one call of `model.forward` compiled once per backend: `torch.compile(mode=
"reduce-overhead", fullgraph=True)` (CUDA graphs) on CUDA, plain inductor on CPU with
`compile="on"`. Sampling, seeds, the repetition penalty, eos/stop handling and the counters are
those of the dynamic path (`hf_sampling.py`). Verified here on CPU only (float32 tiny Llama, eager
and compiled: token-identical to the dynamic path, greedy and seeded sampling); not yet verified
on a GPU.
"""

from __future__ import annotations

import os
import sys

import torch

from ..errors import UserError
from .base import GenerationParams
from .hf_cache import additive_mask, kv_bytes_per_token, prefill_layout
from .hf_sampling import row_seed


def static_options(static_cache, compile) -> tuple[str, str]:
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


def static_cache_supported(config) -> bool:
    """True when a StaticCache of this model has plain full-attention layers only (what the static path handles)."""
    try:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        return all(type(layer) is StaticLayer for layer in StaticCache(config=config, max_cache_len=8).layers)
    except Exception:  # an exotic config: keep the dynamic path
        return False


class StaticDecode:
    """`HFBackend`'s fixed-shape decode (see the module docstring)."""

    def _generate_static(self, encoded, params: GenerationParams, outputs) -> bool:
        """The static-cache path (fixed-shape batches, sorted by length): fills `outputs`; False when
        the first static batch failed and the backend fell back to the dynamic path."""
        requests = [(i * params.n + j, ids, row_seed(params.seed, ids, j)) for i, ids in enumerate(encoded) for j in range(params.n)]
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
        input_ids, valid, pos, allowed = prefill_layout(rows, P, C, self.pad_id)
        mask = additive_mask(allowed, self.dtype)
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
