"""The hf backend's continuous batching (`hf_decode.py`): rows join and leave a running batch.

Against references: greedy output token-identical to HF `generate` one prompt at a time, whatever the
batch size, token budget and arrival order; seeded samples independent of batch composition; requests
returned by `on_done` run in the same batch; the KV store's row moves and column shifts."""

from __future__ import annotations

import torch

from constitutional.backends.base import GenerationParams, Request, run_queue, run_waves
from constitutional.backends.hf import HFBackend
from constitutional.backends.hf_slots import _Store

from test_backend_hf import CONVS, hf_greedy

FEW_SHOT = [{"role": "user", "content": "Here are examples of good answers. " * 5}, {"role": "assistant", "content": "Understood."}]
LONG = [FEW_SHOT + [{"role": "user", "content": q}] for q in ("How do I bake bread?", "hi", "Which is less harmful?", "Tell me more " * 8)]


def test_greedy_matches_hf_generate_under_continuous_batching(tiny_model_dir):
    """Mixed lengths (short chat prompts and long few-shot ones), a batch of 2 rows and a tight token
    budget force rows to join mid-decode, columns to shift and the front to be trimmed."""
    convs = CONVS + LONG
    ref = [hf_greedy(HFBackend(str(tiny_model_dir), dtype="float32"), c, 12) for c in convs]
    for rows, budget in ((2, 256), (3, 100_000), (64, 100_000)):
        b = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=rows, token_budget=budget, min_prefix_tokens=4)
        assert b.generate_ids(convs, GenerationParams(max_new_tokens=12, temperature=0)) == ref, (rows, budget)
        assert b.stats["decode_rows"] <= rows * b.stats["decode_steps"]


def test_samples_do_not_depend_on_what_else_is_in_the_batch(tiny_model_dir):
    params = GenerationParams(max_new_tokens=10, temperature=1.0, top_p=0.9, n=2, seed=3, repetition_penalty=1.3)
    b = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=64)
    together = b.generate_ids(CONVS + LONG, params)
    alone = [ids for c in CONVS + LONG for ids in HFBackend(str(tiny_model_dir), dtype="float32", max_rows=1).generate_ids([c], params)]
    assert together == alone
    # different settings side by side in one running batch: each row keeps its own
    greedy = GenerationParams(max_new_tokens=5, temperature=0)
    mixed: dict = {}
    run_queue(b, [Request(c, params if i % 2 else greedy, key=i) for i, c in enumerate(CONVS)], lambda r, out: mixed.__setitem__(r.key, out))
    for i, c in enumerate(CONVS):
        expected = b.generate([c], params if i % 2 else greedy)
        assert [str(x) for x in mixed[i]] == [str(x) for x in expected]


def test_on_done_requests_join_the_running_batch(tiny_model_dir):
    """A chain of three requests per conversation, each built from the previous answer (as revise's
    critique -> revision rounds): the same texts as running the chain step by step, all in one queue."""
    b = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=3, min_prefix_tokens=4)
    params = GenerationParams(max_new_tokens=6, temperature=0)
    finished: dict = {}

    def on_done(req, outs):
        conv, step = req.key
        history = conv + [{"role": "assistant", "content": str(outs[0])}]
        if step == 2:
            finished[len(finished)] = history
            return None
        return [Request(history + [{"role": "user", "content": "Revise it."}], params, key=(history + [{"role": "user", "content": "Revise it."}], step + 1))]

    start = [[{"role": "user", "content": q}] for q in ("hi", "How do I bake bread?", "Which is less harmful?")]
    run_queue(b, [Request(c, params, key=(c, 0)) for c in start], on_done)
    assert len(finished) == 3
    steps_batched = b.stats["decode_steps"]
    # the same chains one step at a time
    ref = []
    for c in start:
        conv = c
        for step in range(3):
            out = b.generate([conv], params)[0]
            conv = conv + [{"role": "assistant", "content": str(out)}]
            if step < 2:
                conv = conv + [{"role": "user", "content": "Revise it."}]
        ref.append(conv)
    assert sorted(map(str, finished.values())) == sorted(map(str, ref))
    assert steps_batched < b.stats["decode_steps"] - steps_batched  # the queue kept rows decoding together


def test_run_waves_matches_the_scheduler(tiny_model_dir):
    b = HFBackend(str(tiny_model_dir), dtype="float32")
    params = GenerationParams(max_new_tokens=6, temperature=0.8, n=2, seed=1)
    got_q, got_w = {}, {}
    reqs = lambda: [Request(c, params, key=i) for i, c in enumerate(CONVS)]  # noqa: E731
    run_queue(b, reqs(), lambda r, o: got_q.__setitem__(r.key, list(map(str, o))))
    run_waves(b, reqs(), lambda r, o: got_w.__setitem__(r.key, list(map(str, o))))
    assert got_q == got_w and len(got_q) == len(CONVS)


def test_store_moves_and_shifts_rows():
    s = _Store(n_layers=2, heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))
    s.reserve(3, 4)
    s.B, s.n = 3, 4
    for i in range(2):
        s.k[i][:3, 0, :4, 0] = torch.arange(12, dtype=torch.float32).view(3, 4)
    s.mask[:3, :4] = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    s.move_row(2, 0)
    assert s.k[1][0, 0, :4, 0].tolist() == [8, 9, 10, 11] and s.mask[0, :4].all()
    s.shift(3)  # room in front
    assert s.n == 7 and s.k[0][1, 0, 3:7, 0].tolist() == [4, 5, 6, 7] and not s.mask[:3, :3].any()
    s.shift(-3)
    assert s.n == 4 and s.k[0][1, 0, :4, 0].tolist() == [4, 5, 6, 7] and s.mask[1, :4].tolist() == [False, False, True, True]
    s.reserve(9, 600)  # growth keeps the content
    assert s.rows_cap >= 9 and s.cols_cap >= 600 and s.k[0][1, 0, :4, 0].tolist() == [4, 5, 6, 7]


def test_schedule_runs_without_autograd(tiny_model_dir):
    """Stages call `schedule` outside any `no_grad`. With autograd on, every decode step's graph stayed
    alive through the KV buffers it writes into: revise on the embedded model ended holding 5.4 GB in
    200k live tensors (8.2 GB peak). No forward of the scheduler may record a graph, and the KV
    buffers never require grad."""
    b = HFBackend(str(tiny_model_dir), dtype="float32", max_rows=2, token_budget=256, min_prefix_tokens=4)
    seen: list[bool] = []
    hook = b.model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    assert torch.is_grad_enabled()
    results: dict = {}
    b.schedule([Request(c, GenerationParams(max_new_tokens=8, temperature=1.0, seed=1), key=i) for i, c in enumerate(CONVS + LONG)],
               lambda r, out: results.__setitem__(r.key, out))
    hook.remove()
    assert len(results) == len(CONVS + LONG) and seen and not any(seen)
    decoder = b._decoder()
    decoder.run([Request(LONG[0], GenerationParams(max_new_tokens=4, temperature=0))], lambda r, out: None)
    assert decoder.store.k and not any(t.requires_grad for t in decoder.store.k + decoder.store.v)
