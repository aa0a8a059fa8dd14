"""Is a change of a rate beyond noise? Confidence intervals for proportions and their difference.

Pure functions on counts (no model, no numpy), right for any n and any rate, 0 and 1 included:

- `wilson(k, n)`: the Wilson score interval with continuity correction for the proportion k / n
  (Newcombe 1998, "Two-sided confidence intervals for the single proportion", method 4);
- `difference(k1, n1, k2, n2)`: Newcombe's hybrid score interval for p2 - p1 of two independent
  proportions, built from the two Wilson intervals ("Interval estimation for the difference
  between independent proportions", Statistics in Medicine 1998, method 11): with (l_i, u_i) the
  interval of p_i and d = p2 - p1, the bounds are d - sqrt((p2 - l2)^2 + (u1 - p1)^2) and
  d + sqrt((u2 - p2)^2 + (p1 - l1)^2);
- `verdict(k1, n1, k2, n2)`: "beyond noise" when that interval excludes 0, "within noise" when
  it holds 0, "too few items" when no outcome at these sizes (not even 0 of n1 against n2 of n2)
  could give an interval that excludes 0, so the data cannot tell a change from noise.

z = 1.96 (95 %) by default. The plain normal interval 2 sqrt(2 p (1 - p) / n) is 0 at p = 0 or 1 and
calls any change real; these intervals are not.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054
BEYOND, WITHIN, TOO_FEW = "beyond noise", "within noise", "too few items"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The continuity-corrected Wilson score interval of k successes out of n (n >= 1)."""
    if not 0 <= k <= n or n < 1:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    p, q, z2 = k / n, 1 - k / n, z * z
    denominator = 2 * (n + z2)
    lower = 0.0 if k == 0 else max(0.0, (2 * n * p + z2 - 1 - z * math.sqrt(z2 - 2 - 1 / n + 4 * p * (n * q + 1)))
                                   / denominator)
    upper = 1.0 if k == n else min(1.0, (2 * n * p + z2 + 1 + z * math.sqrt(z2 + 2 - 1 / n + 4 * p * (n * q - 1)))
                                   / denominator)
    return lower, upper


def difference(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's interval for p2 - p1 (p1 = k1 / n1, p2 = k2 / n2, independent samples)."""
    (l1, u1), (l2, u2) = wilson(k1, n1, z), wilson(k2, n2, z)
    p1, p2 = k1 / n1, k2 / n2
    d = p2 - p1
    return d - math.hypot(p2 - l2, u1 - p1), d + math.hypot(u2 - p2, p1 - l1)


def verdict(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> str:
    """BEYOND, WITHIN or TOO_FEW for the change from k1 / n1 to k2 / n2 (see the module docstring)."""
    if n1 < 1 or n2 < 1 or difference(0, n1, n2, n2, z)[0] <= 0:
        return TOO_FEW
    lower, upper = difference(k1, n1, k2, n2, z)
    return BEYOND if lower > 0 or upper < 0 else WITHIN
