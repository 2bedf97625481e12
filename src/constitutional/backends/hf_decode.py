"""Continuous batching for the `hf` backend: one queue of generation requests, one running batch.

Every generation stage hands its requests to `HFBackend.schedule(requests, on_done)` (or to
`generate`, which is a `schedule` that collects the results). Rows (one per sample of a request)
wait in a queue; the running batch takes a waiting row as soon as it has room, so it stays full
while rows of different lengths finish at different times; the requests that `on_done` returns
(a retry, the next round's critique or revision) join the same queue, in front, so chains of
requests finish and are written out steadily.

The KV cache of the running batch lives in preallocated buffers, one (rows, heads, columns, dim)
pair per layer, behind transformers' `Cache` interface (`hf_slots.SlotCache`): a decode step
writes one column for every row (no copy of the whole cache per step, as a `DynamicCache`'s `torch.cat`
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
(`hf_cascade`); otherwise each row holds its copy. A finished row's prompt of `cascade_min_prefix`+
tokens is kept as one more prefix until the call ends (`_keep_prompt`): revise's revision request
starts with its critique's prompt, a retry is the same prompt again. Memory: the batch is sized by a
token budget (`token_budget` rows x columns of KV), not a fixed count.

Each row samples with its own generator seeded from (seed, prompt, sample index): the same seed
gives the same samples whatever else is in the batch and in whatever order rows come and go.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from ..memory import trim
from .base import GenerationParams, Request
from .hf_cache import kv_shape, prefill_layout
from .hf_cascade import Group, cascade
from .hf_sampling import penalise_repeats, row_seed
from .hf_slots import SlotCache, _Store


TRIM_EVERY = 16  # decode steps between handing freed heap pages back to the OS (`memory.trim`)


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
    col: int = -1  # with a cascade prefix or none: the store column of its first own prompt token


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
        self.active: list[_Row] = []  # rows in slot order
        self.logits = None  # (B, vocab) float32: the next token's logits of every live row
        self.submitted = 0
        self._submit(list(requests), front=False)
        self.kept: list[tuple] = []  # prompts `_keep_prompt` added to the backend's prefix caches
        steps = 0
        try:
            while self.waiting or self.active:
                if self.active:
                    self._decode_step()
                    steps += 1
                    if steps % TRIM_EVERY == 0:
                        trim()
                if self.waiting:
                    self._admit()
        finally:
            # a kept prompt serves the requests of this call (a chain's next step, a retry); a stage
            # that goes on to train beside the backend (distill) must not hold them
            for key in self.kept:
                self.b._prefix_kv.pop(key, None)
            self.prefixes = {}
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

    def _shift(self, delta: int) -> None:
        self.store.shift(delta)
        for r in self.active:
            if r.col >= 0:
                r.col += delta

    def _keep_prompt(self, slot: int, row: _Row) -> None:
        """Keep a finished row's prompt KV (but its last token: a prompt keeps one of its own) as a
        prefix the backend may reuse: a revision request starts with its critique request's prompt,
        and a retry is the same prompt again. Long prompts only (`cascade_min_prefix`), read from the
        row's prefix cache and its own columns."""
        b, s = self.b, self.store
        n = len(row.ids) - 1
        if row.col < 0 or n < b.cascade_min_prefix or not b.cascade_ok:  # cascade_ok: prefix caching on
            return
        key = tuple(row.ids[:n])
        if key in b._prefix_kv:
            return
        own = n - len(row.prefix)
        base = self.prefixes.get(row.prefix) if row.prefix else None
        if row.prefix and base is None:
            return
        cache = DynamicCache()
        for i in range(s.n_layers):
            k = s.k[i][slot : slot + 1, :, row.col : row.col + own]
            v = s.v[i][slot : slot + 1, :, row.col : row.col + own]
            if base is not None:
                k, v = torch.cat([base.layers[i].keys, k], 2), torch.cat([base.layers[i].values, v], 2)
            else:  # a view of the batch's buffers, which later rows overwrite
                k, v = k.clone(), v.clone()
            cache.update(k, v, i)
        b._remember(key, cache)
        self.kept.append(key)
        b.stats["prompts_kept"] += 1

    def _remove(self, done: list[int]) -> list[int]:
        """Drop finished rows (positions in `active`, ascending): the last live rows move into their
        slots (one row copied per hole). Returns the old positions of the rows now in slots 0..B-1."""
        s = self.store
        finished = [self.active[k] for k in done]
        for k, row in zip(done, finished):
            self._keep_prompt(k, row)
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
            self._shift(-first)

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
            self._shift(width - s.n)
        s.reserve(s.B + len(rows), s.n + 1)
        lo, hi = s.B, s.B + len(rows)
        for i, layer in enumerate(out.cache.layers):
            s.k[i][lo:hi, :, s.n - width : s.n] = layer.keys
            s.v[i][lo:hi, :, s.n - width : s.n] = layer.values
        s.mask[lo:hi, :] = False
        s.mask[lo:hi, s.n - width : s.n] = valid[:, lo_col : P + L]
        s.B = hi
        for r, p, own in zip(rows, pos[:, -1].tolist(), suffixes):
            r.pos = p + 1
            r.gen = torch.Generator().manual_seed(r.seed)
            r.prefix = prefix if shared else ()
            r.col = s.n - len(own) if shared or not prefix else -1
        self.active += rows
        first = out.logits[:, -1, :].float()
        self.logits = first if self.logits is None or not len(self.logits) else torch.cat([self.logits, first])
