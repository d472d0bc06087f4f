"""Write Muon's per-step statistics (``Muon.stats()``) to CSV or TensorBoard.

    opt = muonkit.Muon(groups)
    with muonkit.StatsLogger("runs/stats.csv", every=10) as log:     # or format="tensorboard"
        for step in range(steps):
            ...; opt.step()
            log.log(step, opt)        # only on logged steps: the statistics of the step just taken
                                      # (opt.recompute_stats(), one device sync; with diagnostics=True, opt.stats())

The CSV is in long form, one ``step,key,value`` row per statistic, so groups added later (or any dict
of floats you pass instead of an optimizer) just add rows. TensorBoard needs the ``tensorboard`` package
(``pip install "muonkit[logging]"``) and writes one scalar series per key.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "StatsLogger"]

FORMATS = ("csv", "tensorboard")


class StatsLogger:
    """Append statistics every ``every`` steps to ``path`` (a .csv file, or a TensorBoard log directory)."""

    def __init__(self, path: str | Path, *, format: str = "csv", every: int = 1):
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        self.path = Path(path)
        self.format = format
        self.every = every
        self._writer: Any = None
        self._file: Any = None
        if format == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError(
                    'format="tensorboard" needs the tensorboard package: pip install "muonkit[logging]"'
                ) from err
            self._writer = SummaryWriter(log_dir=str(self.path))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", newline="")  # noqa: SIM115 - closed by close()
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(["step", "key", "value"])

    def log(self, step: int, values: Mapping[str, float] | Any) -> bool:
        """Record ``values`` (a dict, or an object with ``stats()`` such as ``Muon``) for ``step``.

        A ``Muon`` without ``diagnostics=True`` gives ``recompute_stats()`` (call this after ``step()``, before
        the gradients are cleared), so that only the logged steps pay for the statistics. Returns whether
        anything was written (only every ``every``-th step is).
        """
        if step % self.every:
            return False
        if self._writer is None:
            raise ValueError(f"this StatsLogger for {self.path} is closed")
        if hasattr(values, "recompute_stats") and not getattr(values, "diagnostics", False):
            stats = values.recompute_stats()
        else:
            stats = values.stats() if hasattr(values, "stats") else values
        for key, value in sorted(stats.items()):
            value = float(value)
            if self.format == "tensorboard":
                self._writer.add_scalar(key, value, step)
            else:
                self._writer.writerow([step, key, repr(value) if math.isfinite(value) else str(value)])
        if self._file is not None:
            self._file.flush()
        return True

    def close(self) -> None:
        if self.format == "tensorboard" and self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        self._writer = None

    def __enter__(self) -> StatsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
