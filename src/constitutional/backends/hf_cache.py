"""The `hf` backend's shared prefix and KV layout (docs/ARCHITECTURE.md "Model backends").

Every critique, revision and label prompt starts with the same few-shot block, and on a CPU its
prefill costs more than decoding. The backend encodes the longest token prefix that prompts share
once and keeps its KV cache (an LRU of 512 MB of KV), and a finished long prompt's too, which a
later one may extend (`hf_decode`: a revision request extends its critique's prompt, a retry
repeats one). A new row is prefilled as `[shared prefix][left padding][own suffix]`, with explicit
position ids so the padding in the middle is invisible to the model (`prefill_layout`,
`additive_mask`). `PrefixCache` is the part of `HFBackend` that holds and
uses those caches; the functions here are pure tensor layout.
"""

from __future__ import annotations

import copy
import os
from typing import Sequence

import torch


def lcp(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    if not seqs:
        return 0
    return min(lcp2(seqs[0], s) for s in seqs)


def lcp2(a: Sequence[int], b: Sequence[int]) -> int:
    """`lcp` of two sequences by binary search on slice equality (C-speed compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prefill_layout(suffixes: Sequence[Sequence[int]], P: int, keys: int, pad_id: int):
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


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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


PREFIX_CACHE_MB = 512  # KV of kept prefixes (few-shot blocks, finished prompts a later one extends)


def prefix_cache_tokens(config, dtype) -> int:
    """Tokens of prefix KV the backend keeps (`PREFIX_CACHE_MB`; 4,096 at least)."""
    return max(4096, int(PREFIX_CACHE_MB * 2**20 // kv_bytes_per_token(config, dtype)))


def default_token_budget(config, dtype, device) -> int:
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


class PrefixCache:
    """`HFBackend`'s shared-prefix KV caches (`self._prefix_kv`, an LRU of at most
    `prefix_cache_tokens` tokens in all) and the masked forward after one."""

    def _split_prefix(self, seqs: Sequence[Sequence[int]]) -> int:
        """How many leading tokens all `seqs` share and will be encoded once (0 when not worth it)."""
        if not self.prefix_cache or len(seqs) < 2:
            return 0
        p = min(lcp(seqs), min(len(s) for s in seqs) - 1)  # every row keeps >= 1 own token
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
        self._remember(prefix, out.cache)
        return out.cache

    def _remember(self, prefix: tuple[int, ...], cache) -> None:
        """Keep `cache` (the KV of `prefix`, batch 1) as a prefix later prompts may start with; the
        least recently used ones go once the kept tokens pass `prefix_cache_tokens` (one always stays)."""
        self._prefix_kv[prefix] = cache
        self._prefix_kv.move_to_end(prefix)
        while len(self._prefix_kv) > 1 and sum(len(p) for p in self._prefix_kv) > self.prefix_cache_tokens:
            self._prefix_kv.popitem(last=False)

    def _batch_cache(self, prefix: tuple[int, ...], batch: int):
        if not prefix:
            return None
        self.stats["prefix_tokens_reused"] += len(prefix) * batch
        cache = copy.deepcopy(self._prefix_cache(prefix))
        cache.batch_repeat_interleave(batch)
        return cache

    def _cascades(self, prefix: tuple[int, ...]) -> bool:
        """Whether rows after `prefix` read it from its own cache (`hf_cascade`) rather than a copy."""
        return self.cascade_ok and len(prefix) >= self.cascade_min_prefix

    def _masked_forward(self, prefix: tuple[int, ...], input_ids, allowed, position_ids, use_cache: bool, **kwargs):
        """Forward `input_ids` (B, T) after the cached `prefix` with a custom attention pattern.

        allowed: (B, T, P + T) bool, True where a query may attend to a key. With cascade attention
        (`hf_cascade`; `_cascades`: a model that allows it, a long enough prefix) the prefix's cache
        is read once for all rows and the cache returned holds the rows' own T tokens only;
        otherwise the prefix cache is copied per row, the pattern becomes the additive 4D mask
        (0 / dtype-min) that transformers passes to attention as given, and the cache returned
        holds P + T tokens per row.
        """
        B, P = input_ids.shape[0], len(prefix)
        args = dict(input_ids=input_ids.to(self.device), position_ids=position_ids.to(self.device), use_cache=use_cache, **kwargs)
        if self._cascades(prefix):
            from transformers import DynamicCache

            from .hf_cascade import Group, cascade

            self.stats["prefix_tokens_reused"] += P * B
            own = allowed[:, :, P:].to(self.device)
            with cascade(self.model, [Group(None, self._prefix_cache(prefix))], own):
                return self.model(attention_mask=additive_mask(allowed[:, :, P:], self.dtype).to(self.device),
                                  cache=DynamicCache(config=self.model.config) if use_cache else None, **args)
        mask = additive_mask(allowed, self.dtype)
        return self.model(attention_mask=mask.to(self.device), cache=self._batch_cache(prefix, B), **args)

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
        shared = max((lcp2(ids, other) for other in pool if other != ids), default=0)
        shared = min(shared, len(ids) - 1)
        if shared >= self.min_prefix_tokens and shared >= len(best) + 64:
            return tuple(ids[:shared])
        return best if len(best) >= self.min_prefix_tokens else ()
