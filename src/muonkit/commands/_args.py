"""argparse types for numbers in a range: a value outside gives argparse's one-line error and exit 2."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


def number(low: float | None = None, high: float | None = None, *, integer: bool = False,
           open_low: bool = False) -> Callable[[str], float | int]:  # fmt: skip
    """A type accepting a finite number (an int with ``integer``) in ``[low, high]`` (``(low, high]`` with
    ``open_low``); ``None`` leaves that side open."""
    what = "a whole number" if integer else "a finite number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if open_low else '>='} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    expected = what + (" " + " and ".join(bounds) if bounds else "")

    def parse(text: str) -> float | int:
        try:
            value: float | int = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (low is None or (value > low if open_low else value >= low))
        ok = ok and (high is None or value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse
