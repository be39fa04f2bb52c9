"""Units, and the one way a number is written for people.

Every page, finding, table cell and command output writes its numbers through `number` (and
`plus_minus` for an estimate with its 95% half width), so a value reads the same wherever it
appears and a missing one is always spelled NO_VALUE. It lives at the bottom of the layers
because the analysis prints text too (recommend, design) and may not import report/.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MIB = 1024 * 1024  # bytes in a MiB

# A value that was not measured or cannot be computed (NaN, None): one spelling everywhere.
NO_VALUE = "–"


def number(value: Any, digits: int = 3, integers: bool = True) -> str:
    """A number as people read it: whole floats without decimals when `integers` (table cells:
    counts, deltas), >= 100 without decimals, >= 1 with two, smaller ones with `digits`
    significant digits. integers=False keeps "2.00" next to "10.50" (sentences). Text and
    other values pass through as str; True/False read yes/no."""
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return NO_VALUE
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value)}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isinf(v):
            return "unbounded" if v > 0 else "-unbounded"
        if abs(v) < 1e-9:  # float residue of a difference of equal numbers (-6.8e-15) reads as 0
            v = 0.0
        if integers and v == int(v) and abs(v) < 1e6:
            return f"{int(v)}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.{digits}g}"
    return str(value)


def plus_minus(mean: Any, half: Any, unit: str = "", integers: bool = True) -> str:
    """ "mean ± half unit"; without a finite half width, "mean unit" (callers that must say
    why there is none add it)."""
    text = number(mean, integers=integers)
    if has_value(half):
        text += f" ± {number(half, integers=integers)}"
    return text + unit


def has_value(value: Any) -> bool:
    """A finite number (what `number` writes as digits)."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, (bool, np.bool_))
        and math.isfinite(float(value))
    )


def signed_change(change: Any, half: Any = math.nan, unit: str = "") -> str:
    """A change with its sign and one decimal, "+1.2% ± 0.4%" (unit after each part); NO_VALUE
    when the change was not measured."""
    if not has_value(change):
        return NO_VALUE
    text = f"{float(change):+.1f}{unit}"
    return text + (f" ± {float(half):.1f}{unit}" if has_value(half) else "")
