"""Shared-prefix ("cascade") attention for the `hf` backend (docs/ARCHITECTURE.md "Model backends").

Critique, revision and label prompts start with one long few-shot block. Without this module every
row of a batch holds its own copy of that block's KV cache, and every decode step reads all of
them: at 12 rows behind a 1,800-token prefix that is ~1 GB of keys and values per step for a 135M
model, twice its weights. Here the prefix's KV cache is kept once (batch 1) and each row's cache
holds its own tokens only; attention splits into the queries of all rows that share a prefix
against that one prefix (the rows' queries folded into one matrix: one read of the prefix per
step) and each row against its own keys, and the two parts are joined by their log-sum-exps
(FlashInfer's cascade). This is the exact attention, not an approximation: the softmax over
[prefix keys, own keys], computed in two parts. On a CPU both parts run in torch's flash kernel
(`_attend`).

`cascade(groups, own_mask)` is a context manager: while it is open, the model's attention
function (the entry of transformers' `ALL_ATTENTION_FUNCTIONS` its config names) is replaced by
`cascade_attention`, which reads the groups (rows, prefix cache) and the own-key mask from it.
`supported(model)` says whether a model's attention layers are plain enough for this (full
attention, `layer_idx`, no softcapping or sinks); other models keep a copy of the prefix per row.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# Shared prefixes shorter than this are copied into the rows as before: attending in two parts and
# joining them costs a fixed ~0.1 ms per layer, which a copied prefix costs only past ~300 tokens
# at 12 rows (135M model, 2-core CPU: 0.27 against 0.16 ms at 32 tokens, 0.55 against 0.91 at 1,024).
MIN_PREFIX = 256

_local = threading.local()
_MISSING = object()
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class Group:
    """Rows `rows` (None: every row of the batch; else a long tensor of row indices) attend to the
    KV cache `prefix` (a transformers cache of batch 1) before their own keys."""

    rows: torch.Tensor | None
    prefix: object


def supported(model) -> bool:
    """Whether `cascade` may replace this model's attention: a Llama-style decoder whose every layer
    is full attention with sdpa or eager attention, no softcap, no sliding window, no sinks."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attn_logit_softcapping", None):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return model.config.model_type in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "granite", "phi3")


@contextlib.contextmanager
def cascade(model, groups: list[Group], own_mask: torch.Tensor):
    """Run the model's forward passes inside with cascade attention.

    own_mask: (rows, queries, own keys) bool, True where a query may see a key of its own row (the
    keys the cache returns for this forward). Every prefix key is visible to every query of its rows.
    """
    local = ALL_ATTENTION_FUNCTIONS._local_mapping  # an instance override, as `ALL_ATTENTION_FUNCTIONS[name] = f` makes
    name = model.config._attn_implementation
    before = local.get(name, _MISSING)
    _local.state = (groups, own_mask, {})  # the last: own-key masks as attention takes them, built once per forward
    local[name] = cascade_attention
    try:
        yield
    finally:
        _local.state = None
        if before is _MISSING:
            local.pop(name, None)
        else:
            local[name] = before


def _attend(q, k, v, mask, scale: float):
    """Attention of q (N, h, Q, d) over k, v (N, h, S, d) with an additive mask (N, 1, Q, S) or None:
    (output (N, h, Q, d), log-sum-exp of the scores (N, h, Q), float32). On a CPU, torch's flash
    kernel (it returns the log-sum-exp and never holds the (Q, S) scores; the plain products below
    were no faster than attending over a copied prefix); elsewhere the plain products."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
        return out, lse.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def cascade_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention signature: query (B, H, T, d), key/value (B, Hkv, S, d) of the rows'
    own tokens; returns ((B, T, H, d), None). The mask transformers built is not used: the own-key
    mask and the prefix groups come from the open `cascade`. Each part (prefix, own keys) is attended
    on its own and the two are joined by their log-sum-exps: the softmax over all keys, exactly."""
    groups, own_mask, masks = _local.state
    B, H, T, d = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g = H // Hkv
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    # heads h = kv * g + j share kv head `kv` (transformers' repeat_kv): fold (g, T) into one query axis
    q = query.reshape(B, Hkv, g * T, d)
    mask = masks.get((g, S, query.dtype))
    if mask is None:  # every layer of one forward attends with the same mask
        visible = own_mask[:, None, None, :, :S].expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
        mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
        masks[(g, S, query.dtype)] = mask
    out, lse = _attend(q, key, value, mask, scale)  # every row over its own keys
    out = out.float()
    idx = module.layer_idx
    for grp in groups:
        layer = grp.prefix.layers[idx]
        pk, pv = layer.keys, layer.values  # (1, Hkv, P, d)
        rows = None if grp.rows is None else grp.rows.to(query.device)
        qr = q if rows is None else q[rows]
        R = qr.shape[0]
        # all R rows' queries against the one prefix: (1, Hkv, R*gT, d) over (1, Hkv, P, d)
        o_p, l_p = _attend(qr.transpose(0, 1).reshape(1, Hkv, R * g * T, d), pk, pv, None, scale)
        o_p = o_p.reshape(Hkv, R, g * T, d).transpose(0, 1).float()
        l_p = l_p.reshape(Hkv, R, g * T).transpose(0, 1)
        o_o, l_o = (out, lse) if rows is None else (out[rows], lse[rows])
        top = torch.maximum(l_o, l_p)
        w_o, w_p = torch.exp(l_o - top), torch.exp(l_p - top)
        joined = (o_o * w_o[..., None] + o_p * w_p[..., None]) / (w_o + w_p)[..., None]
        if rows is None:
            out = joined
        else:
            out[rows] = joined
    # (B, Hkv, g*T, d) -> (B, H, T, d) -> (B, T, H, d), as transformers' attention functions return
    return out.to(query.dtype).reshape(B, H, T, d).transpose(1, 2).contiguous(), None
