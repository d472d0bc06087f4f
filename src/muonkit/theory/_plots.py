"""matplotlib without a display, imported only when a plot is drawn (matplotlib is an optional dependency)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
