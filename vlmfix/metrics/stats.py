"""Is a method's effect beyond noise? Item-level intervals and paired tests for a grid of runs
(`vlmfix compare`). `vlmfix.metrics.intervals` holds the closed-form intervals of one proportion and of
the difference of two independent ones; this module holds what needs the items themselves:

- `ratio_bootstrap(num, den)`: the percentile bootstrap 95 % interval of a ratio of sums over items,
  sum(num) / sum(den) (a mean when every den is 1: POPE accuracy, CHAIR_s; a ratio of counts otherwise:
  CHAIR_i = hallucinated mentions / mentions, Recall, words per caption). The items (images,
  questions) are resampled with replacement, `draws` times (default 2000), from a seeded
  `numpy.random.Generator` (PCG64), so an interval is the same on every machine;
- `paired_bootstrap(a, b)`: the same for the difference b - a of two method sets' ratios on the same
  items, each draw resampling the items once for both (the pairing), with a two-sided bootstrap
  p-value 2 min(P*(d <= 0), P*(d >= 0)) (capped at 1), where P* is the share of draws;
- `mcnemar(correct_a, correct_b)`: McNemar's exact test on paired right/wrong answers (POPE): with b the
  items only a answers right and c those only b does, p = min(1, 2 sum_{k <= min(b, c)} C(b + c, k) / 2^(b + c))
  (the two-sided exact binomial test of b against Binomial(b + c, 1/2); 1 when b + c = 0);
- `holm(pvalues)`: Holm's step-down adjusted p-values (Holm 1979): sorted ascending, the k-th (from 0) of m
  becomes max over j <= k of min(1, (m - j) p_(j)); reject at level alpha where adjusted <= alpha. It
  controls the family-wise error over the whole grid's tests.

An interval is the (2.5 %, 97.5 %) percentile pair of the draws, computed as numpy's default
("linear") percentile. A ratio whose resampled denominator is 0 counts as 0 (as CHAIR_i of no mention).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DRAWS = 2000
LEVEL = 0.95


def _indices(n: int, draws: int, seed: int) -> np.ndarray:
    """The resampled item indices, shape (draws, n): the one source of randomness of this module."""
    if n < 1:
        raise ValueError("need at least one item to resample")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def _columns(num: Sequence[float], den: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    num_a = np.asarray(num, dtype=np.float64)
    den_a = np.ones_like(num_a) if den is None else np.asarray(den, dtype=np.float64)
    if num_a.ndim != 1 or num_a.shape != den_a.shape:
        raise ValueError(f"numerators and denominators must be two lists of one length, got {num_a.shape} and "
                         f"{den_a.shape}")
    return num_a, den_a


def _ratios(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> np.ndarray:
    top, bottom = num[idx].sum(axis=1), den[idx].sum(axis=1)
    return np.divide(top, bottom, out=np.zeros_like(top), where=bottom != 0)


def ratio(num: Sequence[float], den: Sequence[float] | None = None) -> float:
    """sum(num) / sum(den) (0 when sum(den) is 0); den None: the mean of num."""
    num_a, den_a = _columns(num, den)
    total = den_a.sum()
    return float(num_a.sum() / total) if total else 0.0


def _bounds(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def ratio_bootstrap(num: Sequence[float], den: Sequence[float] | None = None, draws: int = DRAWS, seed: int = 0,
                    level: float = LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high): sum(num) / sum(den) over the items and its percentile bootstrap interval."""
    num_a, den_a = _columns(num, den)
    low, high = _bounds(_ratios(num_a, den_a, _indices(len(num_a), draws, seed)), level)
    return ratio(num_a, den_a), low, high


def paired_bootstrap(num_a: Sequence[float], den_a: Sequence[float] | None, num_b: Sequence[float],
                     den_b: Sequence[float] | None, draws: int = DRAWS, seed: int = 0,
                     level: float = LEVEL) -> dict[str, float]:
    """The difference b - a of two ratios over the same items (item i of a is item i of b):
    {"difference", "low", "high", "p"} (see the module docstring)."""
    na, da = _columns(num_a, den_a)
    nb, db = _columns(num_b, den_b)
    if len(na) != len(nb):
        raise ValueError(f"paired samples need the same items, got {len(na)} and {len(nb)}")
    idx = _indices(len(na), draws, seed)
    diffs = _ratios(nb, db, idx) - _ratios(na, da, idx)
    low, high = _bounds(diffs, level)
    p = min(1.0, 2 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    return {"difference": ratio(nb, db) - ratio(na, da), "low": low, "high": high, "p": p}


def mcnemar_table(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both right, only a right, only b right, both wrong) over paired answers."""
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired answers need the same items, got {len(correct_a)} and {len(correct_b)}")
    pairs = list(zip(map(bool, correct_a), map(bool, correct_b)))
    return (sum(a and b for a, b in pairs), sum(a and not b for a, b in pairs),
            sum(b and not a for a, b in pairs), sum(not a and not b for a, b in pairs))


def mcnemar_p(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value of b and c discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, float]:
    """McNemar's exact test of two method sets' right/wrong answers on the same questions:
    {"table": (both, only a, only b, neither), "p"}."""
    table = mcnemar_table(correct_a, correct_b)
    return {"table": table, "p": mcnemar_p(table[1], table[2])}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's adjusted p-values, in the order given."""
    m = len(pvalues)
    if any(not 0 <= p <= 1 for p in pvalues):
        raise ValueError(f"p-values must lie in [0, 1], got {list(pvalues)}")
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
