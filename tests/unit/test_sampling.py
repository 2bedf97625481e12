"""Top-p filtering from a top-k (`nucleus`) against the full-vocabulary sort it replaces, and the
per-row draw (`draw`) against a brute-force inverse of the cumulative distribution."""

import torch

from constitutional.backends.hf_sampling import NUCLEUS_TOP_K, draw, nucleus, nucleus_sorted


def _probs(rows: int, vocab: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g) * scale, dim=-1)


def test_nucleus_equals_the_full_sort_on_peaked_and_flat_rows():
    # scale 8: a few tokens hold the mass (the top-k path); scale 0.5: nearly flat, the nucleus
    # reaches past the top k (the full-sort fallback); mixed in one batch so both paths run together
    probs = torch.cat([_probs(24, 49152, 8.0, 0), _probs(8, 49152, 0.5, 1), _probs(8, 49152, 2.5, 2)])
    for top_p in (0.5, 0.9, 0.95, 0.999):
        ref = nucleus_sorted(probs.clone(), top_p)
        out = nucleus(probs, top_p)
        assert torch.equal(out, ref), top_p
        kept = (out > 0).sum(-1)
        assert kept.min() >= 1
    top_mass = probs.topk(NUCLEUS_TOP_K, dim=-1).values.sum(-1)
    assert (top_mass > 0.9).any() and (top_mass <= 0.9).any()  # both paths were exercised


def test_nucleus_with_k_at_or_above_the_vocabulary_and_tiny_k():
    probs = _probs(16, 40, 1.5, 3)
    for k in (1, 3, 40, 1000):
        for top_p in (0.3, 0.8, 0.99):
            assert torch.equal(nucleus(probs, top_p, k=k), nucleus_sorted(probs.clone(), top_p)), (k, top_p)


def test_nucleus_keeps_the_smallest_set_reaching_top_p_brute_force():
    probs = _probs(6, 12, 1.0, 4).double()
    top_p = 0.7
    out = nucleus(probs, top_p, k=5)
    for row, o in zip(probs, out):
        order = sorted(range(len(row)), key=lambda i: -float(row[i]))
        kept, mass = set(), 0.0
        for i in order:
            kept.add(i)
            mass += float(row[i])
            if mass >= top_p:
                break
        assert {i for i in range(len(row)) if o[i] > 0} == kept
        assert all(float(o[i]) == float(row[i]) for i in kept)


def test_seeded_samples_are_unchanged_by_the_top_k_path():
    probs = _probs(32, 49152, 6.0, 5)
    a = nucleus(probs, 0.9)
    b = nucleus_sorted(probs.clone(), 0.9)
    for k in range(32):
        ga, gb = torch.Generator().manual_seed(k), torch.Generator().manual_seed(k)
        assert int(draw(a[k : k + 1], [ga])) == int(draw(b[k : k + 1], [gb]))


def test_draw_inverts_each_rows_cumulative_distribution_brute_force():
    """Row k's token is the first whose cumulative weight passes u·total, u being the first float64
    uniform of its generator: computed here by walking the row in Python."""
    probs = torch.cat([nucleus(_probs(12, 300, 3.0, 6), 0.8), _probs(4, 300, 0.5, 7)])
    probs[3, :] = 0
    probs[3, 17] = 2.0  # one token left, unnormalised weight
    for seed in range(5):
        got = draw(probs, [torch.Generator().manual_seed(seed * 100 + k) for k in range(len(probs))])
        for k, row in enumerate(probs.double().tolist()):
            u = float(torch.rand((), generator=torch.Generator().manual_seed(seed * 100 + k), dtype=torch.float64))
            target, acc, want = u * sum(row), 0.0, None
            for i, w in enumerate(row):
                acc += w
                if acc > target:
                    want = i
                    break
            assert int(got[k]) == want and row[want] > 0, (seed, k)
    assert int(draw(probs[3:4], [torch.Generator().manual_seed(1)])) == 17


def test_draw_matches_the_distribution_and_ignores_the_rest_of_the_batch():
    weights = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.cat([draw(weights.repeat(100, 1), [g] * 100) for _ in range(n // 100)]), minlength=5).double()
    assert counts[1] == counts[4] == 0
    expected = weights.double() * n
    sd = (n * weights.double() * (1 - weights.double())).sqrt()
    assert ((counts - expected).abs() <= 4 * sd + 1e-9).all(), counts
    # a row's token depends on its weights and its generator only, not on the rows beside it
    probs = _probs(8, 49152, 5.0, 8)
    together = draw(probs, [torch.Generator().manual_seed(k) for k in range(8)])
    alone = [int(draw(probs[k : k + 1], [torch.Generator().manual_seed(k)])) for k in range(8)]
    assert together.tolist() == alone
