"""vlmfix.metrics.intervals: Wilson (continuity-corrected) and Newcombe intervals on hand-computed and
published fixtures, including rates of 0 and 1 and n = 2."""

from __future__ import annotations

import pytest

from vlmfix.metrics.intervals import BEYOND, TOO_FEW, WITHIN, difference, verdict, wilson


def test_wilson_on_hand_computed_and_published_values():
    # 0 of 2, by hand (z = 1.959964, z^2 = 3.841459): upper = (z^2 + 1 + z sqrt(z^2 + 2 - 1/2)) / (2 (2 + z^2))
    # = (4.841459 + 1.959964 * 2.311160) / 11.682918 = 9.371248 / 11.682918 = 0.802133; lower 0 (p = 0)
    assert wilson(0, 2) == pytest.approx((0.0, 0.802133), abs=1e-6)
    lo, hi = wilson(2, 2)  # p = 1: the mirror image
    assert hi == 1.0 and lo == pytest.approx(1 - 0.802133, abs=1e-6)
    # 100 of 100, by hand: lower = (200 + z^2 - 1 - z sqrt(z^2 - 2 - 1/100 + 4)) / (2 (100 + z^2))
    # = (202.841459 - 1.959964 * 2.414841) / 207.682918 = 0.953899
    assert wilson(100, 100) == pytest.approx((0.953899, 1.0), abs=1e-6)
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 4
    assert wilson(0, 10) == pytest.approx((0.0, 0.3445), abs=1e-4)
    assert wilson(1, 29) == pytest.approx((0.0018, 0.1963), abs=1e-4)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)


def test_newcombe_difference():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II, method 11: 56/70 - 48/80
    assert difference(48, 80, 56, 70) == pytest.approx((0.0428, 0.3422), abs=1e-4)
    # 0 of 2 -> 2 of 2, by hand from the Wilson bounds above: d = 1,
    # lower = 1 - sqrt((1 - 0.197867)^2 + (0.802133 - 0)^2) = 1 - 1.134387, upper = 1 + 0
    assert difference(0, 2, 2, 2) == pytest.approx((-0.134387, 1.0), abs=1e-6)


def test_verdicts_for_any_n_and_rate():
    # n = 2: not even 0 of 2 -> 2 of 2 excludes 0, so no change can be told from noise
    assert verdict(0, 2, 1, 2) == TOO_FEW and verdict(0, 2, 2, 2) == TOO_FEW and verdict(2, 2, 0, 2) == TOO_FEW
    # n = 3: the most extreme change is (0 of 3 -> 3 of 3: lower bound 0.024 > 0)
    assert verdict(0, 3, 3, 3) == BEYOND and verdict(0, 3, 1, 3) == WITHIN
    # rates of 0 and 1 (where 2 sqrt(2 p (1 - p) / n) is 0 and called any change real)
    assert verdict(0, 100, 3, 100) == WITHIN and verdict(0, 100, 10, 100) == BEYOND
    assert verdict(100, 100, 97, 100) == WITHIN and verdict(100, 100, 90, 100) == BEYOND
    assert verdict(1400, 2000, 1360, 2000) == WITHIN and verdict(1400, 2000, 1500, 2000) == BEYOND
    assert verdict(0, 0, 0, 5) == TOO_FEW  # nothing measured (e.g. no object mentions)
