"""Newton-Schulz coefficient lab, in float64 NumPy (this package never imports torch).

* ``polynomials``: odd polynomials, compositions ``phi``, log grids, cost, Taylor rows.
* ``fixed_point``: fixed point at 1, slope, basin, the cubic and quintic families.
* ``quality``: band, where a schedule starts working, orthogonality error on matrices.
* ``tune``: Jordan-style constrained tuning (maximise the slope at 0 within a band).
* ``minimax``: per-step minimax schedules (Polar Express).
"""

from .fixed_point import (
    FixedPointReport,
    analyse,
    cubic_attracting_range,
    cubic_family,
    largest_convergent_a,
    quintic_attracting_b_range,
    quintic_family,
    quintic_line,
)
from .minimax import MinimaxSchedule, minimax_polynomial, polar_express
from .polynomials import as_rows, compose, derivative, evaluate, log_grid, schedule_cost, taylor_row
from .quality import band, orthogonality_error, smallest_x_in_band, summary
from .tune import TuneResult, tune

__all__ = [
    "FixedPointReport",
    "MinimaxSchedule",
    "TuneResult",
    "analyse",
    "as_rows",
    "band",
    "compose",
    "cubic_attracting_range",
    "cubic_family",
    "derivative",
    "evaluate",
    "largest_convergent_a",
    "log_grid",
    "minimax_polynomial",
    "orthogonality_error",
    "polar_express",
    "quintic_attracting_b_range",
    "quintic_family",
    "quintic_line",
    "schedule_cost",
    "smallest_x_in_band",
    "summary",
    "taylor_row",
    "tune",
]
