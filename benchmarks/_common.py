"""Shared helpers for the benchmark programs: timing, environment, optional competitors, JSON output."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from muonkit.train.report import environment as report_environment


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_ms_pipelined(fn: Callable[[], Any], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Mean milliseconds of ``fn()`` called ``reps`` times back to back with no synchronisation in between, as a
    training loop calls an optimizer step (the host's work for one call overlaps the GPU's work for the one
    before). ``time_ms`` instead synchronises around every call, so host time before the first launch counts."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def matmul_peak_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 (GPU) or fp32 (CPU) matmul rate on random n x n inputs, TFLOP/s."""
    if device.type != "cuda":
        n = 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def environment(device: torch.device) -> dict[str, Any]:
    return report_environment(str(device))


def competitors() -> dict[str, Any]:
    """Other Muon implementations that are importable here (torch.optim.Muon, KellerJordan's, Dao-AILab's)."""
    found: dict[str, Any] = {}
    try:
        from torch.optim import _muon

        found["torch.optim.Muon"] = _muon
    except ImportError:
        pass
    try:
        import muon as kj  # KellerJordan's muon-optimizer wheel

        if hasattr(kj, "zeropower_via_newtonschulz5"):
            found["KellerJordan"] = kj
    except ImportError:
        pass
    try:
        import gram_newton_schulz as gns

        found["gram-newton-schulz"] = gns
    except ImportError:
        pass
    return found


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
