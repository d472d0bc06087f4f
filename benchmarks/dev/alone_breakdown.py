"""Where the time of one GPT-2-small step timed "alone" goes (synchronised before and after, as ``step.py``'s first
column): host time before the first CUDA-graph replay, the GPU's wait for it, and the GPU's time from the first
replay to the end, against the same step run back to back.

    python benchmarks/dev/alone_breakdown.py --method gram --nosplit --out alone.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, time_ms_pipelined, write_json
from step import SETS, add_set_arguments, make_params, split_groups

import muonkit
from muonkit.accel import cuda_graphs


def breakdown(opt: Any, reps: int) -> dict[str, float]:
    """Per step (median of ``reps``): ``alone_ms`` (start event to end event), ``host_to_first_ms`` (perf_counter from
    the call to the first replay), ``gpu_wait_ms`` (start event to an event recorded just before the first replay),
    ``gpu_after_first_ms`` (that event to the end), ``host_step_ms`` (the call's host time)."""
    original = cuda_graphs.Replays.run
    marks: list[Any] = []

    def run(self: Any, *args: Any, **kwargs: Any) -> None:
        if not marks:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((time.perf_counter(), event))
        original(self, *args, **kwargs)

    rows: dict[str, list[float]] = {k: [] for k in ("alone_ms", "host_to_first_ms", "gpu_wait_ms",
                                                    "gpu_after_first_ms", "host_step_ms")}  # fmt: skip
    cuda_graphs.Replays.run = run  # type: ignore[method-assign]
    try:
        for _ in range(reps):
            marks.clear()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            end.record()
            end.synchronize()
            first_t, first_ev = marks[0]
            rows["alone_ms"].append(start.elapsed_time(end))
            rows["host_to_first_ms"].append((first_t - t0) * 1e3)
            rows["gpu_wait_ms"].append(start.elapsed_time(first_ev))
            rows["gpu_after_first_ms"].append(first_ev.elapsed_time(end))
            rows["host_step_ms"].append((t1 - t0) * 1e3)
    finally:
        cuda_graphs.Replays.run = original  # type: ignore[method-assign]
    return {k: statistics.median(v) for k, v in rows.items()}


def timed_parts(reps_out: dict[str, list[float]]) -> list[tuple[Any, str, Any]]:
    """Wrap the step's host stages so each call adds its perf_counter milliseconds to ``reps_out[name]``; returns
    what to restore."""
    from muonkit.optim import functional, muon, plans

    # each name patched where its callers look it up
    targets = [(muon.Muon, "_gather"), (muon.Muon, "_muon_group"), (muon.Muon, "_step_again"),
               (functional, "_fused_step_applies"), (plans, "_plan_for"), (functional, "_remembered_plan"),
               (functional, "_state_key"), (muon, "_same_environment"), (plans, "_tensors"),
               (plans._StepPlan, "run"), (muon, "_muon_steps")]  # fmt: skip
    saved = []
    for owner, name in targets:
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def wrapper(*args: Any, _f: Any = original, _n: str = name, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                reps_out.setdefault(_n, []).append((time.perf_counter() - t) * 1e3)

        setattr(owner, name, wrapper)
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_set_arguments(ap)
    ap.add_argument("--max-batch", type=int, default=None, help="Muon's max_batch (NS batches of at most this many)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--detail", action="store_true", help="also the host time of each stage of the step (wrapped)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    layers, shapes = SETS[args.set]
    params = make_params(layers, shapes, device)
    opt = muonkit.Muon(params if args.nosplit else split_groups(params), method=args.method, nonfinite="ignore",
                       max_batch=args.max_batch)  # fmt: skip
    for _ in range(5):
        opt.step()
    result = breakdown(opt, args.reps)
    result["back_to_back_ms"] = time_ms_pipelined(opt.step, device, reps=args.reps)
    if args.detail:
        parts: dict[str, list[float]] = {}
        saved = timed_parts(parts)
        try:
            result.update({f"alone_wrapped_{k}": v for k, v in breakdown(opt, args.reps).items()})
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)
        result.update({f"host_{k}_ms": statistics.median(v) for k, v in parts.items()})
    for k, v in result.items():
        print(f"{k:<20} {v:8.3f}")
    if args.out:
        write_json(args.out, {"environment": environment(device), "set": args.set, "method": args.method,
                              "nosplit": args.nosplit, "max_batch": args.max_batch, **result})  # fmt: skip


if __name__ == "__main__":
    main()
