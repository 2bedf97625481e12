"""Continuous batching for the `hf` backend: one queue of generation requests, one running batch.

Every generation stage hands its requests to `HFBackend.schedule(requests, on_done)` (or to
`generate`, which is a `schedule` that collects the results). Rows (one per sample of a request)
wait in a queue; the running batch takes a waiting row as soon as it has room, so it stays full
while rows of different lengths finish at different times; the requests that `on_done` returns
(a retry, the next round's critique or revision) join the same queue, in front, so chains of
requests finish and are written out steadily.

The KV cache of the running batch lives in preallocated buffers, one (rows, heads, columns, dim)
pair per layer, behind transformers' `Cache` interface (`SlotCache`): a decode step writes one
column for every row (no copy of the whole cache per step, as a `DynamicCache`'s `torch.cat`
does), a finished row is replaced by the last one (a copy of one row), and a new row is written
right-aligned at the current column: row r is `[dead columns][its prompt][its generated tokens]`,
its positions counted from its first real token, so the dead columns are invisible (attention
mask) and cost only their share of the attention products. Columns dead for every row are cut off
the front when they grow to a quarter of the cache.

A new row's prompt is prefilled with the longest shared prefix whose KV cache the backend already
holds (the few-shot block of critique, revision and label prompts), or with a new shared prefix
when the rows waiting beside it share a longer one; see `HFBackend._prefix_for`. Where the model
allows it (`hf_cascade.supported`), the prefix's KV cache is not copied into the rows: a row holds
its own tokens only, and every decode step reads the prefix once for all rows that share it
(`hf_cascade`); otherwise each row holds its copy. Memory: the batch is sized by a token budget
(`token_budget` rows x columns of KV), not a fixed count.

Each row samples with its own generator seeded from (seed, prompt, sample index): the same seed
gives the same samples whatever else is in the batch and in whatever order rows come and go.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..memory import trim
from .base import GenerationParams, Request
from .hf_cache import kv_shape, prefill_layout
from .hf_cascade import Group, cascade
from .hf_sampling import penalise_repeats, row_seed


TRIM_EVERY = 16  # decode steps between handing freed heap pages back to the OS (`memory.trim`)


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


@dataclass
class _Row:
    """One sample of one request while it waits or generates."""

    req: Request
    j: int  # sample index
    ids: list[int]  # prompt token ids
    seed: int
    max_new: int
    gen: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    ended: bool = False  # stopped by eos or a stop string
    pos: int = 0  # position id of the next token to feed
    prefix: tuple[int, ...] = ()  # the shared prefix it attends to from the prefix's own cache (cascade), else ()


class ContinuousDecoder:
    """Runs `HFBackend.schedule`: see the module docstring."""

    def __init__(self, backend, token_budget: int, max_rows: int, prefill_tokens: int = 4096):
        self.b = backend
        self.token_budget = max(256, int(token_budget))
        self.max_rows = max(1, int(max_rows))
        self.prefill_tokens = max(64, int(prefill_tokens))  # suffix tokens per prefill forward
        self.store = _Store(*kv_shape(backend.model.config), backend.dtype, backend.device)
        self.cache = SlotCache(self.store)
        self.prefixes: dict[tuple, object] = {}  # shared prefix -> its KV cache, while live rows read it (cascade)

    # ------------------------------------------------------------ queue
    @torch.no_grad()
    def run(self, requests, on_done) -> None:
        """Generate `requests` and the ones `on_done` returns. Without autograd: `schedule` is called
        from stages, outside any `no_grad`, and with it every decode step's graph stayed alive through
        the KV buffers it writes into (revise ended holding over 5 GB of them, 8.2 GB peak)."""
        self.waiting: deque[_Row] = deque()
        self.left: dict[int, list] = {}  # id(request) -> [results by sample, samples left]
        self.on_done = on_done
        self.prefixes = {}
        self.active: list[_Row] = []  # rows in slot order
        self.logits = None  # (B, vocab) float32: the next token's logits of every live row
        self.submitted = 0
        self._submit(list(requests), front=False)
        steps = 0
        while self.waiting or self.active:
            if self.active:
                self._decode_step()
                steps += 1
                if steps % TRIM_EVERY == 0:
                    trim()
            if self.waiting:
                self._admit()
        trim()

    def _submit(self, requests: list[Request], front: bool) -> None:
        rows = []
        for req in requests:
            req.params.check()
            ids = self.b._encode_chat(req.conversation)
            self.b._check_length(ids, self.submitted, "prompt")
            self.submitted += 1
            max_new = min(req.params.max_new_tokens, self.b.max_positions - len(ids))
            self.left[id(req)] = [[None] * req.params.n, req.params.n]
            rows += [_Row(req, j, ids, row_seed(req.params.seed, ids, j), max_new) for j in range(req.params.n)]
        if front:
            self.waiting.extendleft(reversed(rows))
        else:
            self.waiting.extend(rows)

    def _finish(self, row: _Row) -> None:
        slot = self.left[id(row.req)]
        slot[0][row.j] = (row.out, row.ended)
        slot[1] -= 1
        if slot[1] == 0:
            del self.left[id(row.req)]
            more = self.on_done(row.req, slot[0])
            if more:
                self._submit(list(more), front=True)

    # ------------------------------------------------------------ decode
    def _decode_step(self) -> None:
        s, b = self.store, self.b
        tokens = self._sample()
        done = []  # positions in `active` of the rows that finish at this token
        for k, row in enumerate(self.active):
            t = int(tokens[k])
            if t in b.eos_ids:
                row.ended = True
            else:
                row.out.append(t)
                if row.req.params.stop and b._hit_stop(row.out, row.req.params.stop):
                    row.ended = True
            if row.ended or len(row.out) >= row.max_new:
                done.append(k)
        b.stats["generated_tokens"] += len(self.active)
        b.stats["decode_steps"] += 1
        b.stats["decode_rows"] += len(self.active)
        if done:
            tokens = tokens[torch.tensor(self._remove(done), dtype=torch.long)]
        if not self.active:
            return
        s.reserve(s.B, s.n + 1)
        s.mask[: s.B, s.n] = True
        pos = torch.tensor([r.pos for r in self.active])[:, None]
        mask = s.mask[: s.B, : s.n + 1]
        with self._attention(mask):
            out = b.model(
                input_ids=tokens[:, None].to(b.device),
                attention_mask=mask.long().to(b.device),
                position_ids=pos.to(b.device),
                cache=self.cache,
                use_cache=True,
            )
        s.n += 1
        for r in self.active:
            r.pos += 1
        self.logits = out.logits[:, -1, :].float()
        self._trim()

    def _attention(self, mask: torch.Tensor):
        """The decode step's attention: cascade (`hf_cascade`) when some live row reads a shared
        prefix from the prefix's own cache, transformers' own otherwise."""
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(self.active):
            if r.prefix:
                groups.setdefault(r.prefix, []).append(k)
        if not groups:
            return contextlib.nullcontext()
        B = len(self.active)
        parts = [Group(None if len(ks) == B else torch.tensor(ks, dtype=torch.long), self.prefixes[p]) for p, ks in groups.items()]
        return cascade(self.b.model, parts, mask[:, None, :].to(self.b.device))

    def _remove(self, done: list[int]) -> list[int]:
        """Drop finished rows (positions in `active`, ascending): the last live rows move into their
        slots (one row copied per hole). Returns the old positions of the rows now in slots 0..B-1."""
        s = self.store
        finished = [self.active[k] for k in done]
        gone = set(done)
        m = len(self.active) - len(done)
        perm = list(range(m))
        movers = [k for k in range(m, len(self.active)) if k not in gone]
        for hole, src in zip([k for k in done if k < m], movers):
            s.move_row(src, hole)
            perm[hole] = src
        self.active = [self.active[k] for k in perm]
        self.logits = self.logits[torch.tensor(perm, dtype=torch.long, device=self.logits.device)]
        s.B = m
        live = {r.prefix for r in self.active}
        for p in [p for p in self.prefixes if p not in live]:
            del self.prefixes[p]  # the backend's LRU may still hold it
        for row in finished:
            self._finish(row)
        return perm

    def _trim(self) -> None:
        s = self.store
        live = s.mask[: s.B, : s.n].any(0)
        first = int(live.float().argmax()) if bool(live.any()) else s.n
        if first >= 64 and first * 4 >= s.n:
            s.shift(-first)

    def _sample(self) -> torch.Tensor:
        """One token per live row; rows are sampled in groups that share sampling settings."""
        b = self.b
        tokens = torch.empty(len(self.active), dtype=torch.long)
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(self.active):
            p = r.req.params
            groups.setdefault((p.temperature, p.top_p, p.repetition_penalty), []).append(k)
        for (temperature, top_p, penalty), ks in groups.items():
            idx = torch.tensor(ks, device=self.logits.device)
            logits = self.logits if len(ks) == len(self.active) else self.logits[idx]
            if penalty != 1.0:
                logits = penalise_repeats(logits, [self.active[k].out for k in ks], penalty)
            params = GenerationParams(temperature=temperature, top_p=top_p)
            tokens[torch.tensor(ks)] = b._sample(logits, [self.active[k].gen for k in ks], params)
        return tokens

    # ------------------------------------------------------------ admission
    def _admit(self) -> None:
        """Move waiting rows into the batch while the token budget and `max_rows` allow; prefill them
        in groups that share a cached prefix. A row counts the columns it takes in the batch: its
        whole prompt, or with cascade attention its prompt after the shared prefix (the prefix's
        cache is held once, outside the batch)."""
        s = self.store
        rem = max((r.max_new - len(r.out) for r in self.active), default=0)
        width = s.n
        pool = [r.ids for r in list(self.waiting)[:24]]
        taken: list[tuple[_Row, tuple]] = []
        while self.waiting and s.B + len(taken) < self.max_rows:
            row = self.waiting[0]
            prefix = self.b._prefix_for(row.ids, pool)
            w = max(width, len(row.ids) - (len(prefix) if self.b._cascades(prefix) else 0))
            need = (s.B + len(taken) + 1) * (w + max(rem, row.max_new))
            if taken and need > self.token_budget:
                break
            if not taken and s.B and need > self.token_budget:
                break
            taken.append((self.waiting.popleft(), prefix))
            width, rem = w, max(rem, row.max_new)
            if sum(len(r.ids) - len(p) for r, p in taken) >= self.prefill_tokens:
                break
        if not taken:
            return
        groups: dict[tuple, list[_Row]] = {}
        for row, prefix in taken:
            groups.setdefault(prefix, []).append(row)
        for prefix, rows in groups.items():
            self._prefill(prefix, rows)

    @torch.no_grad()
    def _prefill(self, prefix: tuple[int, ...], rows: list[_Row]) -> None:
        b, s = self.b, self.store
        P = len(prefix)
        suffixes = [r.ids[P:] for r in rows]
        L = max(len(x) for x in suffixes)
        input_ids, valid, pos, allowed = prefill_layout(suffixes, P, P + L, b.pad_id)
        out = b._masked_forward(prefix, input_ids, allowed, pos[:, P:], use_cache=True, logits_to_keep=1)
        b.stats["prefill_tokens"] += int(sum(len(x) for x in suffixes))
        shared = b._cascades(prefix)  # the rows keep their own tokens; the prefix stays in its own cache
        lo_col = P if shared else 0
        width = P + L - lo_col
        if shared:
            self.prefixes[prefix] = b._prefix_cache(prefix)
        if s.B == 0:  # an empty batch starts over at column 0
            s.n = 0
        if width > s.n:
            s.shift(width - s.n)
        s.reserve(s.B + len(rows), s.n + 1)
        lo, hi = s.B, s.B + len(rows)
        for i, layer in enumerate(out.cache.layers):
            s.k[i][lo:hi, :, s.n - width : s.n] = layer.keys
            s.v[i][lo:hi, :, s.n - width : s.n] = layer.values
        s.mask[lo:hi, :] = False
        s.mask[lo:hi, s.n - width : s.n] = valid[:, lo_col : P + L]
        s.B = hi
        for r, p in zip(rows, pos[:, -1].tolist()):
            r.pos = p + 1
            r.gen = torch.Generator().manual_seed(r.seed)
            r.prefix = prefix if shared else ()
        self.active += rows
        first = out.logits[:, -1, :].float()
        self.logits = first if self.logits is None or not len(self.logits) else torch.cat([self.logits, first])
