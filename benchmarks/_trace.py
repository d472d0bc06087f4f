"""Where one optimizer step's time goes, read from a torch.profiler trace (Kineto's Chrome-trace JSON).

A step is the span of a ``torch.profiler.record_function`` range on the host. Its GPU work is every kernel, copy
and fill whose launching runtime call (``cudaLaunchKernel``, ``cudaGraphLaunch``, ...) the host made inside that
range on the range's own thread; Kineto links the two by a correlation id. Per step this gives:

* ``host_ms``: the range on the host (Python, launches, and any wait for the GPU);
* ``wait_ms``: host time inside synchronising runtime calls (``cuda*Synchronize``, blocking ``cudaMemcpy``);
* ``gpu_ms``: the summed duration of the step's GPU work; ``span_ms``: its first start to its last end;
  ``idle_ms``: the span less the union of the work: time the GPU sat waiting for the host inside the step;
* ``launches`` and ``graph_launches``: runtime calls that started GPU work;
* ``first_launch_ms``: host time from the range's start to its first such call;
* ``lead_idle_ms``: how long the GPU sat idle inside the step before its first work began: from the range's start
  (or the end of earlier GPU work still running then) to that work's start;
* ``by_kind_ms``: GPU time per kernel class (``kernel_kind``).

A step the GPU runs back to back has ``idle_ms`` near 0 and ``span_ms`` near ``gpu_ms``; a step bound by its host
shows the difference as idle time. In a loop whose host falls behind its GPU, the host work before the first
launch shows as ``lead_idle_ms``: time the step takes that no GPU work fills. Used by ``train_loop.py --profile``
and ``dev/profile_step.py``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
_WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy")


def kernel_kind(name: str) -> str:
    """A GPU kernel's class, from its name: fused element-wise (muonkit.accel.fused), gemm, reduction, copy, other."""
    low = name.lower()
    if any(s in low for s in ("momentum_kernel", "normalise_kernel", "norms_kernel", "update_kernel")):
        return "fused elementwise"
    if any(s in low for s in ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "matmul", "sym_product")):
        return "gemm"
    if any(s in low for s in ("reduce", "norm", "welford")):
        return "reduction"
    if any(s in low for s in ("copy", "cat", "memcpy", "memset")):
        return "copy"
    return "elementwise/other"


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def step_windows(trace: dict[str, Any], annotation: str) -> list[dict[str, Any]]:
    """One record per ``annotation`` range in ``trace`` (in order); see the module's docstring for the fields."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    ranges = [e for e in events if e.get("name") == annotation and e.get("cat") in ("user_annotation", "cpu_op")]
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    gpu_by_corr: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    gpu_all = []
    for e in events:
        if e.get("cat") in GPU_CATEGORIES:
            gpu_by_corr[e.get("args", {}).get("correlation")].append(e)
            gpu_all.append(e)
    windows = []
    for r in sorted(ranges, key=lambda e: e["ts"]):
        start, end = r["ts"], r["ts"] + r["dur"]
        calls = [
            e for e in runtime
            if e.get("tid") == r.get("tid") and e.get("pid") == r.get("pid") and start <= e["ts"] <= end
        ]  # fmt: skip
        work = [k for e in calls for k in gpu_by_corr.get(e.get("args", {}).get("correlation"), ())]
        spans = [(k["ts"], k["ts"] + k["dur"]) for k in work]
        by_kind: dict[str, float] = defaultdict(float)
        for k in work:
            by_kind[kernel_kind(k["name"])] += k["dur"] / 1e3
        span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0.0
        launching = [e for e in calls if e.get("args", {}).get("correlation") in gpu_by_corr]
        first_launch = (min(e["ts"] for e in launching) - start) if launching else 0.0
        lead = 0.0
        if spans:
            first = min(a for a, _ in spans)
            mine = {id(k) for k in work}
            busy = [k["ts"] + k["dur"] for k in gpu_all if id(k) not in mine and k["ts"] < first]
            lead = max(0.0, first - max([start, *busy]))
        windows.append({
            "host_ms": r["dur"] / 1e3,
            "wait_ms": sum(e["dur"] for e in calls if e["name"] in _WAITS) / 1e3,
            "gpu_ms": sum(k["dur"] for k in work) / 1e3,
            "span_ms": span / 1e3,
            "idle_ms": (span - _union_us(spans)) / 1e3,
            "launches": len(launching),
            "graph_launches": sum(1 for e in calls if "GraphLaunch" in e["name"]),
            "first_launch_ms": first_launch / 1e3,
            "lead_idle_ms": lead / 1e3,
            "by_kind_ms": dict(by_kind),
        })  # fmt: skip
    return windows


def summarise(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the steps of each field (``by_kind_ms`` per class)."""
    if not windows:
        raise ValueError("no steps in the trace: was the step inside the profiled record_function range?")
    out: dict[str, Any] = {key: statistics.median(w[key] for w in windows) for key in windows[0] if key != "by_kind_ms"}
    kinds = {k for w in windows for k in w["by_kind_ms"]}
    out["by_kind_ms"] = {k: statistics.median(w["by_kind_ms"].get(k, 0.0) for w in windows) for k in sorted(kinds)}
    out["steps"] = len(windows)
    return out


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
