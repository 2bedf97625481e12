"""The running batch's KV buffers for `hf_decode` (docs/ARCHITECTURE.md "Model backends"): one
(rows, heads, columns, dim) pair per layer, preallocated and grown in amortised steps, with the
columns each row may attend to (`_Store`), behind transformers' `Cache` interface (`SlotCache`).
A decode step writes one column of every live row; rows move and columns shift only when rows
leave or a longer prompt joins (see `hf_decode`'s module docstring).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _Store:
    """The batch's KV buffers and layout, shared by the `SlotCache` layers."""

    def __init__(self, n_layers: int, heads: int, head_dim: int, dtype, device):
        self.n_layers, self.heads, self.head_dim, self.dtype, self.device = n_layers, heads, head_dim, dtype, device
        self.rows_cap = self.cols_cap = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.B = 0  # live rows: slots [0, B)
        self.n = 0  # columns in use: [0, n); the next decode step writes column n
        self.mask = torch.zeros((0, 0), dtype=torch.bool)  # (rows_cap, cols_cap): which columns each row may attend to

    def reserve(self, rows: int, cols: int) -> None:
        """Grow the buffers (amortised: rows double, columns by 256) so that `rows` x `cols` fit."""
        if rows <= self.rows_cap and cols <= self.cols_cap:
            return
        R = max(rows, self.rows_cap) if rows <= self.rows_cap else max(rows, 2 * self.rows_cap, 4)
        C = max(cols, self.cols_cap) if cols <= self.cols_cap else -(-(cols + 128) // 256) * 256
        shape = (R, self.heads, C, self.head_dim)
        for i in range(self.n_layers):
            for buf in (self.k, self.v):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(buf):
                    if self.B:
                        new[: self.B, :, : self.n] = buf[i][: self.B, :, : self.n]
                    buf[i] = new
                else:
                    buf.append(new)
        mask = torch.zeros((R, C), dtype=torch.bool)
        if self.B:
            mask[: self.B, : self.n] = self.mask[: self.B, : self.n]
        self.mask, self.rows_cap, self.cols_cap = mask, R, C

    def shift(self, delta: int) -> None:
        """Move every live row `delta` columns right (delta > 0: room in front for a longer prompt) or
        left (delta < 0: drop dead front columns)."""
        if delta == 0 or self.B == 0:
            self.n = max(0, self.n + delta)
            return
        if delta > 0:
            self.reserve(self.B, self.n + delta + 1)
        lo = max(0, -delta)
        for buf in (*self.k, *self.v):
            part = buf[: self.B, :, lo : self.n].clone()
            buf[: self.B, :, lo + delta : self.n + delta] = part
        part = self.mask[: self.B, lo : self.n].clone()
        self.mask[: self.B, :] = False
        self.mask[: self.B, lo + delta : self.n + delta] = part
        self.n += delta

    def move_row(self, src: int, dst: int) -> None:
        for buf in (*self.k, *self.v):
            buf[dst, :, : self.n] = buf[src, :, : self.n]
        self.mask[dst, : self.n] = self.mask[src, : self.n]


class _SlotLayer(DynamicLayer):
    """One layer's view of the `_Store`: a decode step writes column `n` of the live rows and attends
    to columns [0, n]."""

    def __init__(self, store: _Store, idx: int):
        super().__init__()
        self.store, self.idx = store, idx
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        s, t = self.store, key_states.shape[-2]
        k, v = s.k[self.idx], s.v[self.idx]
        k[: s.B, :, s.n : s.n + t] = key_states
        v[: s.B, :, s.n : s.n + t] = value_states
        return k[: s.B, :, : s.n + t], v[: s.B, :, : s.n + t]

    def get_seq_length(self) -> int:
        return self.store.n


class SlotCache(Cache):
    """transformers' `Cache` interface over a `_Store` (the running batch's KV buffers)."""

    def __init__(self, store: _Store):
        super().__init__(layers=[_SlotLayer(store, i) for i in range(store.n_layers)])
