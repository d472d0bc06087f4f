"""A small learning-rate sweep on the user's own task (``muonkit train --sweep``).

Each optimizer trains at its default (or given) learning rate times 0.5, 1 and 2, on the same seed, steps, batches
and recipe as the comparison; while the best of them lies on an edge of what was tried, the grid grows by one more
factor of 2 past that edge (at most ``MAX_EXTEND`` times), so that the chosen value lies inside the grid. AdamW is
swept first, so that the AdamW part of the Muon runs (embeddings, head, 1-D parameters) takes AdamW's chosen lr.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .loop import train_one
from .optimizers import resolve_lrs
from .recipe import Recipe
from .tasks import Task

__all__ = ["FACTORS", "MAX_EXTEND", "on_edge", "sweep_lrs"]

FACTORS = (0.5, 1.0, 2.0)
MAX_EXTEND = 2


def sweep_lrs(
    task: Task,
    names: list[str],
    *,
    steps: int,
    seed: int = 0,
    lrs: dict[str, float] | None = None,
    recipe: Recipe | None = None,
    on_run: Callable[[str, float, float], None] | None = None,
) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
    """``(chosen lr per optimizer, per optimizer the lrs tried in increasing order with their final validation loss
    and whether chosen)``; a run whose loss is not finite counts as the worst. The chosen lr can still be the
    grid's first or last after ``MAX_EXTEND`` extensions (``on_edge``). ``on_run(name, lr, loss)`` is called after
    each run."""
    base = resolve_lrs(task.lr_key, lrs)
    chosen: dict[str, float] = {}
    table: dict[str, list[dict[str, Any]]] = {}
    for name in sorted(names, key=lambda n: n != "adamw"):
        tried: dict[float, float] = {}

        def run(lr: float, name: str = name, tried: dict[float, float] = tried) -> None:
            parts = {**base, "adamw": chosen.get("adamw", base["adamw"]), name: lr}
            r = train_one(task, name, steps=steps, eval_every=steps, seed=seed, lrs=parts, recipe=recipe)
            loss = r.val_loss[-1] if r.val_loss and math.isfinite(r.val_loss[-1]) else math.inf
            tried[lr] = loss
            if on_run is not None:
                on_run(name, lr, loss)

        for factor in FACTORS:
            run(base[name] * factor)
        for _ in range(MAX_EXTEND):
            best = min(tried, key=tried.__getitem__)
            if best == min(tried):
                run(best / 2)
            elif best == max(tried):
                run(best * 2)
            else:
                break
        best = min(tried, key=tried.__getitem__)
        chosen[name] = best
        table[name] = [{"lr": lr, "final_val_loss": loss, "chosen": lr == best} for lr, loss in sorted(tried.items())]
    return chosen, table


def on_edge(rows: list[dict[str, Any]]) -> bool:
    """Whether the chosen lr of one optimizer's sweep rows is the smallest or the largest tried."""
    return bool(rows) and (rows[0]["chosen"] or rows[-1]["chosen"])
