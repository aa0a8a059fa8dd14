"""vlmfix.metrics.stats on hand-computed fixtures: a McNemar table worked by hand, Holm's textbook example,
and the vectorised bootstrap against a slow literal loop over the same seeded draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlmfix.metrics import stats


def test_mcnemar_on_a_hand_computed_table():
    # 10 questions: a right on 0-6, b right on 0-3 and 7-9 -> both 4 (0-3), only a 3 (4-6), only b 3 (7-9), neither 0
    a = [True] * 7 + [False] * 3
    b = [True] * 4 + [False] * 3 + [True] * 3
    result = stats.mcnemar(a, b)
    assert result["table"] == (4, 3, 3, 0)
    assert result["p"] == 1.0  # a tie of discordant pairs: no evidence at all
    # b = 1, c = 9: P(X <= 1 | Bin(10, 1/2)) = (1 + 10) / 1024; two-sided: 22 / 1024
    assert stats.mcnemar_p(1, 9) == pytest.approx(22 / 1024)
    assert stats.mcnemar_p(9, 1) == stats.mcnemar_p(1, 9)
    # b = 0, c = 6: 2 / 64
    assert stats.mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert stats.mcnemar_p(0, 0) == 1.0
    with pytest.raises(ValueError, match="same items"):
        stats.mcnemar([True], [True, False])


def test_holm_on_the_textbook_example():
    # four tests, p = 0.01, 0.04, 0.03, 0.005: sorted 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    # 0.04 x 1 = 0.04 -> 0.06 (monotone); at alpha 0.05 only the first two are rejected
    adjusted = stats.holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []
    with pytest.raises(ValueError):
        stats.holm([1.5])


def _slow_percentile(values: list[float], q: float) -> float:
    """numpy's default ('linear') percentile, written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def test_bootstrap_with_a_fixed_seed_matches_a_slow_loop():
    num = [0, 1, 2, 0, 3, 1, 0, 0, 4, 1]
    den = [2, 3, 2, 1, 5, 2, 2, 1, 6, 3]
    draws, seed = 1000, 7
    rng = np.random.default_rng(seed)
    slow = []
    for _ in range(draws):
        picks = [int(i) for i in rng.integers(0, len(num), size=len(num))]
        total = sum(den[i] for i in picks)
        slow.append(sum(num[i] for i in picks) / total if total else 0.0)
    estimate, low, high = stats.ratio_bootstrap(num, den, draws=draws, seed=seed)
    assert estimate == pytest.approx(12 / 27)
    assert low == pytest.approx(_slow_percentile(slow, 2.5))
    assert high == pytest.approx(_slow_percentile(slow, 97.5))
    assert low < estimate < high
    assert stats.ratio_bootstrap(num, den, draws=draws, seed=seed) == (estimate, low, high)  # seeded
    assert stats.ratio_bootstrap(num, den, draws=draws, seed=seed + 1) != (estimate, low, high)


def test_paired_bootstrap_difference_and_its_p_value():
    a = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0] * 3
    same = stats.paired_bootstrap(a, None, a, None, draws=500)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0 and same["p"] == 1.0
    worse = [0] * 30
    drop = stats.paired_bootstrap(a, None, worse, None, draws=500)
    assert drop["difference"] == pytest.approx(-0.8)
    assert drop["high"] < 0 and drop["p"] == 0.0
    slightly = a[:-1] + [1]  # one item of 30 changes: the interval holds 0
    small = stats.paired_bootstrap(a, None, slightly, None, draws=500)
    assert small["low"] <= 0 <= small["high"] and small["p"] > 0.05
    with pytest.raises(ValueError, match="same items"):
        stats.paired_bootstrap([1], None, [1, 0], None)
