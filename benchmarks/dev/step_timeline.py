"""When the optimizer step's host work reaches each launch, inside the training loop of ``train_loop.py``.

``train_loop.py --profile`` says how long the GPU waits at the start of a step (``lead_idle_ms``); this says what the
host does meanwhile. Each step of a variant is timed with marks at the entry and exit of the calls it makes on the
way to its launches (reading the previous step's NaN/Inf result, the repeat's checks, the gradient scan, each CUDA
graph replay, the AdamW groups, fused AdamW's kernel call), as microseconds after ``step()`` was entered, and the
median of each mark over the timed steps is printed in the order they come and written to JSON. The marks cost about
a microsecond each. Inside the loop the same calls take 3-4 times longer than timed alone (the forward and backward
passes leave the host's caches cold), so only a loop tells where the time before the first launch goes.

    python benchmarks/dev/step_timeline.py --out step_timeline_h200.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
import train_loop
from _common import environment, write_json

import muonkit.optim.muon as muon_module
import muonkit.optim.repeat as repeat_module
from muonkit.accel import cuda_graphs, finite
from muonkit.optim import plans

Marks = list[tuple[str, float]]


class Timeline:
    """Marks ``name>`` and ``name<`` around the calls it wraps while a step is being timed (``timed``)."""

    def __init__(self) -> None:
        self.marks: Marks | None = None
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        def marked(*args: Any, **kwargs: Any) -> Any:
            marks = self.marks
            if marks is not None:
                marks.append((name + ">", time.perf_counter()))
            try:
                return original(*args, **kwargs)
            finally:
                if marks is not None:
                    marks.append((name + "<", time.perf_counter()))

        setattr(owner, attr, marked)
        self.undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()

    def timed(self, step: Callable[..., Any], runs: list[Marks]) -> Callable[..., Any]:
        def step_with_marks(*args: Any, **kwargs: Any) -> Any:
            self.marks = [("entry", time.perf_counter())]
            try:
                return step(*args, **kwargs)
            finally:
                self.marks.append(("exit", time.perf_counter()))
                runs.append(self.marks)
                self.marks = None

        return step_with_marks


def instrument(timeline: Timeline) -> None:
    """The calls a repeated muonkit step and fused AdamW's step make on the way to their launches."""
    timeline.wrap(muon_module, "settle", "settle")
    timeline.wrap(muon_module, "step_again", "repeat")
    timeline.wrap(finite.FiniteScan, "run", "scan")
    timeline.wrap(plans._StepPlan, "run", "batches")
    timeline.wrap(cuda_graphs.Replays, "run", "replays")
    timeline.wrap(repeat_module, "adamw_group", "adamw_groups")
    timeline.wrap(repeat_module, "defer", "defer")
    timeline.wrap(torch, "_fused_adamw_", "fused_adamw")
    if torch.cuda.is_available():
        timeline.wrap(torch.cuda.CUDAGraph, "replay", "graph_replay")


def medians(runs: list[Marks]) -> list[tuple[str, float]]:
    """Per mark (the k-th occurrence of a name counted apart, ``name#k``): its median offset from the entry, in us,
    over the steps that have it; in the order of those medians."""
    offsets: dict[str, list[float]] = {}
    for marks in runs:
        entry = marks[0][1]
        seen: dict[str, int] = {}
        for name, at in marks[1:]:
            k = seen.get(name, 0)
            seen[name] = k + 1
            offsets.setdefault(f"{name}#{k}" if k else name, []).append((at - entry) * 1e6)
    return sorted(((name, statistics.median(v)) for name, v in offsets.items()), key=lambda item: item[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="large", choices=sorted(train_loop.SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--qkv", default="fused", choices=["fused", "separate"])
    ap.add_argument("--warmup", type=int, default=12)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    ap.add_argument("--only", default="muonkit (defaults),AdamW (fused)", help="comma-separated variants, in order")
    ap.add_argument("--out", default="step_timeline.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loop_args = argparse.Namespace(size=args.size, batch=args.batch, qkv=args.qkv, warmup=args.warmup,
                                   steps=args.steps, only=None, paired=False, profile=False)  # fmt: skip
    timeline = Timeline()
    instrument(timeline)
    rows = []
    try:
        for name in [n.strip() for n in args.only.split(",")]:
            cuda_graphs.cache.clear()
            trainer = train_loop.Trainer(name, loop_args, device)
            for _ in range(args.warmup):
                trainer.iteration()
            runs: list[Marks] = []
            step = trainer.opt.step
            trainer.opt.step = timeline.timed(step, runs)  # type: ignore[method-assign]
            for _ in range(args.steps):
                trainer.iteration()
            trainer.opt.step = step  # type: ignore[method-assign]
            timeline_us = medians(runs)
            step_ms = statistics.median(trainer.steps[-args.steps :])
            print(f"== {name}: step {step_ms:.3f} ms (median of {args.steps}); host marks, us after step() entry:")
            print("  " + "  ".join(f"{mark} {us:.0f}" for mark, us in timeline_us))
            per_step = [[(mark, (at - marks[0][1]) * 1e6) for mark, at in marks] for marks in runs]
            rows.append({"variant": name, "step_ms": step_ms, "median_us": dict(timeline_us), "per_step": per_step})
            del trainer
    finally:
        timeline.restore()
    write_json(args.out, {"environment": environment(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
