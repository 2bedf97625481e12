"""The statistics of `cai eval` (pure functions, standard library only).

- Elo ratings from pairwise comparisons. The paper (Bai et al. 2022, Figures 2, 3 and 8) reports
  harmlessness and helpfulness as Elo scores fitted to pairwise preferences. Here each comparison
  gives a soft outcome p = P(model i's response is better than model j's) from the feedback model,
  and the ratings are the Bradley–Terry maximum-likelihood strengths θ for

      log L(θ) = Σ_comparisons p · log σ(θ_i - θ_j) + (1 - p) · log σ(θ_j - θ_i),

  on the Elo scale (elo = 400 / ln 10 · θ, so a 400-point gap means 10:1 odds), anchored so that
  the first model is 0 (the base model, when the defaults are used). `prior` adds that many
  virtual comparisons to every compared pair, each an even outcome (p = 0.5): without it a model
  that wins every comparison has an infinite rating; with the default of 1 it is finite and the
  fit moves little once a pair has more than a few comparisons.
- Bootstrap confidence intervals over prompts (`elo_bootstrap`): prompts are resampled with
  replacement, with all the comparisons made on a prompt kept together, and the ratings refitted;
  the interval is the percentile interval of the refits.
- `wilson`: the Wilson score interval of a proportion (refusal rates).
- `bootstrap_mean`: a percentile bootstrap interval of a mean (preference-model scores).
- `paired_change`: how a rate changed between two models answering the same prompts (refusal of
  model vs the starting model): the difference of the rates, Newcombe's score interval for a
  difference of paired proportions (Newcombe 1998, method 10: the two Wilson intervals combined with
  the correlation of the pairs), and the exact McNemar test (two-sided binomial test on the
  discordant pairs: under "no change", a prompt that changed is as likely to change either way).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

ELO_SCALE = 400.0 / math.log(10.0)  # Elo points per nat of log-odds
Z95 = 1.959963984540054  # the standard normal quantile of 0.975

Outcome = tuple[int, int, float]  # (i, j, p): P(model i beats model j) in one comparison


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def win_matrix(outcomes: Sequence[Outcome], n_models: int) -> list[list[float]]:
    """W (n_models x n_models): W[i][j] = the soft wins of i over j, i.e. Σ p over (i, j, p) plus
    Σ (1 - p) over (j, i, p)."""
    w = [[0.0] * n_models for _ in range(n_models)]
    for i, j, p in outcomes:
        if i == j:
            raise ValueError(f"a model compared with itself: {i}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"outcome {p} is not a probability")
        w[i][j] += p
        w[j][i] += 1.0 - p
    return w


def _log_likelihood(theta: list[float], w: list[list[float]]) -> float:
    m = len(theta)
    total = 0.0
    for i in range(m):
        for j in range(m):
            if i != j and w[i][j]:
                d = theta[i] - theta[j]
                total -= w[i][j] * (math.log1p(math.exp(-d)) if d >= 0 else -d + math.log1p(math.exp(d)))
    return total


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a·x = b (Gaussian elimination with partial pivoting); ValueError when singular."""
    n = len(b)
    m = [row[:] + [b[k]] for k, row in enumerate(a)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[piv][c]) < 1e-12:
            raise ValueError("singular system")
        m[c], m[piv] = m[piv], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            if f:
                for k in range(c, n + 1):
                    m[r][k] -= f * m[c][k]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][k] * x[k] for k in range(r + 1, n))) / m[r][r]
    return x


def bradley_terry(w: Sequence[Sequence[float]], prior: float = 1.0, tol: float = 1e-10, max_iter: int = 200) -> list[float]:
    """Bradley–Terry strengths θ (nats of log-odds, θ[0] = 0) maximising Σ_{i≠j} W[i][j]·log σ(θ_i - θ_j).

    w: (M, M) soft wins (`win_matrix`), diagonal ignored. prior: virtual comparisons per compared
    pair, half won by each side. Newton's method on θ[1:] with step halving (the objective is
    concave). ValueError when the comparisons do not connect every model to the first. With
    prior = 0 and a model that never loses (or never wins) the maximum is at infinity and the
    result is merely very large.
    """
    m = len(w)
    w = [[float(w[i][j]) + (prior / 2.0 if i != j and (w[i][j] or w[j][i]) else 0.0) for j in range(m)] for i in range(m)]
    theta = [0.0] * m
    if m == 1:
        return theta
    ll = _log_likelihood(theta, w)
    for _ in range(max_iter):
        grad = [0.0] * m
        hess = [[0.0] * m for _ in range(m)]
        for i in range(m):
            for j in range(m):
                n = w[i][j] + w[j][i]
                if i == j or not n:
                    continue
                s = _sigmoid(theta[i] - theta[j])
                grad[i] += w[i][j] - n * s
                hess[i][i] += n * s * (1.0 - s)
                hess[i][j] -= n * s * (1.0 - s)
        if max(abs(g) for g in grad[1:]) < tol * max(1.0, sum(map(sum, w))):
            return theta
        try:
            step = _solve([row[1:] for row in hess[1:]], grad[1:])
        except ValueError:
            raise ValueError("Bradley-Terry: the comparisons do not connect every model; compare every model with another") from None
        t = 1.0
        while True:
            cand = [0.0] + [theta[k + 1] + t * step[k] for k in range(m - 1)]
            new = _log_likelihood(cand, w)
            if new >= ll - 1e-12 or t < 1e-8:
                break
            t /= 2.0
        theta, ll = cand, new
        if max(abs(s) for s in step) * t < tol:
            return theta
    return theta


def elo(outcomes: Sequence[Outcome], n_models: int, prior: float = 1.0) -> list[float]:
    """Elo ratings (first model = 0) from soft pairwise outcomes; see the module docstring."""
    return [ELO_SCALE * t for t in bradley_terry(win_matrix(outcomes, n_models), prior)]


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 1]) of sorted values."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def elo_bootstrap(groups: Sequence[Sequence[Outcome]], n_models: int, samples: int = 1000, seed: int = 0,
                  prior: float = 1.0, level: float = 0.95) -> tuple[list[float], list[tuple[float, float]]]:
    """(Elo per model, (lo, hi) per model): the fit on all comparisons and a percentile bootstrap
    interval from `samples` refits on prompts drawn with replacement.

    groups: one list of outcomes per prompt (all the comparisons made on that prompt).
    """
    if not groups:
        raise ValueError("elo_bootstrap: no comparisons")
    mats = [win_matrix(g, n_models) for g in groups]
    point = [ELO_SCALE * t for t in bradley_terry(_sum(mats, range(len(mats)), n_models), prior)]
    rng = random.Random(seed)
    fits: list[list[float]] = []
    for _ in range(samples):
        idx = [rng.randrange(len(mats)) for _ in mats]
        fits.append([ELO_SCALE * t for t in bradley_terry(_sum(mats, idx, n_models), prior)])
    alpha = (1.0 - level) / 2.0
    cis = []
    for k in range(n_models):
        xs = sorted(f[k] for f in fits) if fits else [point[k]]
        cis.append((_percentile(xs, alpha), _percentile(xs, 1.0 - alpha)))
    return point, cis


def _sum(mats, idx, n):
    w = [[0.0] * n for _ in range(n)]
    for k in idx:
        for i in range(n):
            row, src = w[i], mats[k][i]
            for j in range(n):
                row[j] += src[j]
    return w


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials ((0, 1) when n = 0: nothing known)."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: {k} successes in {n} trials")
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion(pairs: Sequence[tuple[bool, bool]]) -> dict:
    """A binary judge against labels, from (truth, predicted) pairs: n, tp, fp, tn, fn; accuracy,
    precision and recall (None when undefined), each with its Wilson interval (`<name>_ci`); and
    `majority`, the accuracy of always answering the commoner label."""
    tp = sum(1 for t, p in pairs if t and p)
    fp = sum(1 for t, p in pairs if p and not t)
    fn = sum(1 for t, p in pairs if t and not p)
    tn = len(pairs) - tp - fp - fn
    n = len(pairs)
    out: dict = {"n": n, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    for name, k, m in (("accuracy", tp + tn, n), ("precision", tp, tp + fp), ("recall", tp, tp + fn)):
        out[name] = k / m if m else None
        out[f"{name}_ci"] = wilson(k, m)
    out["majority"] = max(tp + fn, tn + fp) / n if n else None
    return out


def bootstrap_mean(values: Sequence[float], samples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of `values` and its percentile bootstrap interval."""
    if not values:
        raise ValueError("bootstrap_mean: no values")
    n = len(values)
    mean = sum(values) / n
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples)) or [mean]
    alpha = (1.0 - level) / 2.0
    return mean, _percentile(means, alpha), _percentile(means, 1.0 - alpha)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: b pairs changed one way, c the other; P(as extreme | p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_change(before: Sequence[bool], after: Sequence[bool], z: float = Z95, alpha: float = 0.05) -> dict:
    """The change of a rate between two models on the same items: {before, after, difference, ci (of
    the difference, Newcombe's method 10), p_value (exact McNemar), significant (p < alpha), n,
    gained (false -> true), lost (true -> false)}."""
    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} vs {len(after)} items")
    n = len(before)
    if n == 0:
        return {"before": None, "after": None, "difference": None, "ci": [-1.0, 1.0], "p_value": 1.0, "significant": False,
                "n": 0, "gained": 0, "lost": 0}
    both = sum(1 for x, y in zip(before, after) if x and y)
    gained = sum(1 for x, y in zip(before, after) if y and not x)
    lost = sum(1 for x, y in zip(before, after) if x and not y)
    neither = n - both - gained - lost
    p1, p2 = (both + gained) / n, (both + lost) / n  # after, before
    l1, u1 = wilson(both + gained, n, z)
    l2, u2 = wilson(both + lost, n, z)
    # the correlation of the pairs (phi of the 2x2 table), 0 when a margin is empty
    margins = (both + gained) * (lost + neither) * (both + lost) * (gained + neither)
    phi = (both * neither - gained * lost) / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    p = mcnemar_exact(gained, lost)
    return {"before": p2, "after": p1, "difference": d, "ci": [max(-1.0, lo), min(1.0, hi)], "p_value": p, "significant": p < alpha,
            "n": n, "gained": gained, "lost": lost}
