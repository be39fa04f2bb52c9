"""Small statistics the report needs: 95% t intervals, Welch's difference, Pareto fronts.

scipy is not a dependency for four numbers; the t quantiles come from a table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Two-sided 95% Student t quantiles t(0.975, df) from standard tables; between entries we
# interpolate linearly in 1/df, which is accurate to about 1e-3 over this range.
_T975_TABLE = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060,
    9: 2.2622, 10: 2.2281, 11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314,
    16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930, 20: 2.0860, 21: 2.0796, 22: 2.0739,
    23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452,
    30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}
_T975_INF = 1.9600
_T_INV_DF = np.array([1.0 / d for d in sorted(_T975_TABLE, reverse=True)] + [1.0])
_T_VALUES = np.array([_T975_TABLE[d] for d in sorted(_T975_TABLE, reverse=True)])


def t_quantile_975(dof: Any) -> Any:
    """t(0.975, dof) for the two-sided 95% interval; NaN where dof < 1. Accepts arrays."""
    dof_arr = np.asarray(dof, dtype=float)
    inv = np.divide(1.0, dof_arr, out=np.full_like(dof_arr, np.nan), where=dof_arr >= 1)
    # table points sorted by 1/df ascending: 0 (df=inf) first
    xs = np.concatenate([[0.0], _T_INV_DF[:-1]])
    ys = np.concatenate([[_T975_INF], _T_VALUES])
    out = np.interp(np.nan_to_num(inv, nan=0.0), xs, ys)
    out = np.where(np.isnan(inv), np.nan, out)
    return float(out) if out.ndim == 0 else out


def mean_ci95(values: Any) -> tuple[float, float, int]:
    """(mean, half width of the 95% t interval, n) of the finite values; half is NaN if n < 2."""
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(arr[0]), math.nan, 1
    half = t_quantile_975(n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return float(arr.mean()), half, n


def welch_ci95(a: Any, b: Any) -> tuple[float, float]:
    """(mean(a) - mean(b), half width of Welch's 95% interval); half NaN when either n < 2."""
    a_arr = np.asarray(a, dtype=float)
    b_arr = np.asarray(b, dtype=float)
    a_arr, b_arr = a_arr[np.isfinite(a_arr)], b_arr[np.isfinite(b_arr)]
    if a_arr.size == 0 or b_arr.size == 0:
        return math.nan, math.nan
    diff = float(a_arr.mean() - b_arr.mean())
    if a_arr.size < 2 or b_arr.size < 2:
        return diff, math.nan
    va, vb = a_arr.var(ddof=1) / a_arr.size, b_arr.var(ddof=1) / b_arr.size
    se2 = va + vb
    if se2 == 0:
        return diff, 0.0
    dof = se2**2 / (va**2 / (a_arr.size - 1) + vb**2 / (b_arr.size - 1))
    return diff, float(t_quantile_975(dof)) * math.sqrt(se2)


PARETO_TOLERANCE = 0.01  # savings within 1% of the largest count as equal on the frontier


def pareto_mask(cost: Any, benefit: Any, tolerance: float = 0.0) -> np.ndarray:
    """True where no other point is at least as cheap and at least as good.

    Benefits within ``tolerance`` (absolute) of each other count as equal, so a point that buys
    only noise-sized extra benefit for more cost is dominated; of exact duplicates the first is
    kept. NaN points are never Pareto-optimal. O(n^2), fine for the tens of settings a study has.
    """
    c = np.asarray(cost, dtype=float)
    b = np.asarray(benefit, dtype=float)
    valid = np.isfinite(c) & np.isfinite(b)
    n = c.size
    # [i, j]: does j dominate i?
    cheaper_or_equal = c[None, :] <= c[:, None]
    good_enough = b[None, :] >= b[:, None] - tolerance
    better_somewhere = (c[None, :] < c[:, None]) | (b[None, :] > b[:, None])
    duplicate_before = (c[None, :] == c[:, None]) & (b[None, :] == b[:, None]) & (np.arange(n)[None, :] < np.arange(n)[:, None])
    dominates = cheaper_or_equal & good_enough & (better_somewhere | duplicate_before) & valid[None, :]
    return valid & ~dominates.any(axis=1)


# ----------------------------------------------------------------------------- loading
