"""``benchmarks/_trace.py``: the step breakdown that ``train_loop.py --profile`` reports, on a trace whose answer is
known, and on a real profiler trace of a Muon step (the range name and trace format it relies on); the host marks of
``benchmarks/dev/step_timeline.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import muonkit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _trace

STEP = "Optimizer.step#Muon.step"


def _x(name, cat, ts, dur, tid=1, corr=None):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 7, "tid": tid,
            "args": {} if corr is None else {"correlation": corr}}  # fmt: skip


def test_a_step_is_taken_apart_into_host_wait_gpu_work_and_idle_time():
    """Two steps: the first launches a kernel and a CUDA graph (two kernels, overlapping), waits on a stream sync;
    launches from another thread (backward's) and after the range do not count. The second launches nothing."""
    events = [
        _x(STEP, "user_annotation", 100, 100),
        _x("cudaLaunchKernel", "cuda_runtime", 110, 2, corr=1),
        _x("cudaGraphLaunch", "cuda_runtime", 120, 3, corr=2),
        _x("cudaStreamSynchronize", "cuda_runtime", 150, 30, corr=3),
        _x("cudaLaunchKernel", "cuda_runtime", 130, 2, tid=2, corr=4),  # another thread
        _x("cudaLaunchKernel", "cuda_runtime", 250, 2, corr=5),  # after the step
        _x("sm90_xmma_gemm_bf16", "kernel", 300, 10, tid=9, corr=1),
        _x("fused_momentum_kernel", "kernel", 315, 5, tid=9, corr=2),
        _x("vectorized_elementwise_kernel", "kernel", 318, 4, tid=9, corr=2),
        _x("backward_kernel", "kernel", 330, 100, tid=9, corr=4),
        _x("later_kernel", "kernel", 500, 10, tid=9, corr=5),
        _x(STEP, "user_annotation", 600, 40),
    ]
    first, second = _trace.step_windows({"traceEvents": events}, STEP)
    assert first["host_ms"] == pytest.approx(0.1) and first["wait_ms"] == pytest.approx(0.03)
    assert first["gpu_ms"] == pytest.approx(0.019) and first["span_ms"] == pytest.approx(0.022)
    assert first["idle_ms"] == pytest.approx(0.005)  # 310-315 between the kernel and the graph
    assert (first["launches"], first["graph_launches"]) == (2, 1)
    # the first launch 10 us in; the GPU idle from the range's start (100) to the step's first kernel (300)
    assert first["first_launch_ms"] == pytest.approx(0.01) and first["lead_idle_ms"] == pytest.approx(0.2)
    assert first["by_kind_ms"] == pytest.approx({"gemm": 0.01, "fused elementwise": 0.005, "elementwise/other": 0.004})
    assert second == {"host_ms": 0.04, "wait_ms": 0.0, "gpu_ms": 0.0, "span_ms": 0.0, "idle_ms": 0.0,
                      "launches": 0, "graph_launches": 0, "first_launch_ms": 0.0, "lead_idle_ms": 0.0,
                      "by_kind_ms": {}}  # fmt: skip
    summary = _trace.summarise([first, second])
    assert summary["steps"] == 2 and summary["host_ms"] == pytest.approx(0.07)
    assert summary["by_kind_ms"]["gemm"] == pytest.approx(0.005)  # median of 0.01 and (absent) 0
    with pytest.raises(ValueError, match="no steps"):
        _trace.summarise(_trace.step_windows({"traceEvents": events}, "Optimizer.step#AdamW.step"))


def test_gpu_work_still_running_when_the_step_starts_is_not_idle_time():
    """Backward's kernel runs until 250 on the GPU: the step (range from 100, its kernel launched at 120 and run at
    260) finds the GPU busy, so only 250-260 counts as idle before its work."""
    events = [
        _x(STEP, "user_annotation", 100, 50),
        _x("cudaLaunchKernel", "cuda_runtime", 120, 2, corr=1),
        _x("backward_kernel", "kernel", 90, 160, tid=9, corr=9),
        _x("fused_momentum_kernel", "kernel", 260, 5, tid=9, corr=1),
    ]
    (w,) = _trace.step_windows({"traceEvents": events}, STEP)
    assert w["first_launch_ms"] == pytest.approx(0.02) and w["lead_idle_ms"] == pytest.approx(0.01)


def test_a_real_profile_of_muon_steps_has_one_window_per_step(tmp_path):
    """torch.optim's range around ``Muon.step`` is what ``train_loop.py --profile`` looks for: one window per step,
    its host time inside the profiled wall-clock (on the CPU: no GPU work)."""
    from torch.profiler import ProfilerActivity, profile

    w = nn.Parameter(torch.randn(32, 16))
    opt = muonkit.Muon([w])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            w.grad = torch.randn(32, 16)
            opt.step()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    windows = _trace.step_windows(_trace.load(str(tmp_path / "trace.json")), STEP)
    assert len(windows) == 3
    assert all(0 < w["host_ms"] < 10_000 and w["gpu_ms"] == 0 and w["launches"] == 0 for w in windows)


def test_train_loop_profile_reports_each_variants_steps(tmp_path):
    """``train_loop.py --profile`` on the CPU: one row per variant asked for, in order, each with one window per
    timed step (the range it wraps around ``opt.step()`` found in the trace), and torch.optim.Muon as a baseline."""
    import json
    import os
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    out = tmp_path / "loop.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bench.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    names = ["muonkit (defaults)", "torch.optim.Muon + AdamW"]
    subprocess.run([sys.executable, "train_loop.py", "--profile", "--size", "tiny", "--batch", "2", "--steps", "3",
                    "--warmup", "1", "--only", ",".join(names), "--out", str(out)], cwd=bench, env=env, check=True,
                   capture_output=True)  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == names
    assert all(r["steps"] == 3 and len(r["per_step"]) == 3 and r["host_ms"] > 0 for r in rows)


def test_train_loop_with_separate_qkv_keeps_the_model_and_gives_muon_square_matrices():
    """``train_loop.py --qkv separate``: each fused ``qkv`` projection becomes three square ones holding its row
    blocks, so the model computes the same function; ``param_groups`` then hands Muon three ``d x d`` matrices per
    layer where the fused model gave one ``3d x d`` matrix (split in three)."""
    import train_loop

    from muonkit.train.model import GPT, SIZES
    from muonkit.train.optimizers import hidden_matrices

    cfg = SIZES["tiny"]
    torch.manual_seed(0)
    model = GPT(cfg)
    x = torch.randint(0, 256, (2, cfg.ctx))
    with torch.no_grad():
        before = model(x)
    train_loop.separate_qkv(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    shapes = [tuple(p.shape) for p in hidden_matrices(model)[0]]
    d = cfg.d_model
    assert shapes.count((d, d)) == 4 * cfg.n_layer  # q, k, v and the output projection
    assert (3 * d, d) not in shapes


def test_step_timeline_orders_marks_by_median_and_counts_repeats_apart():
    """``benchmarks/dev/step_timeline.py``: each mark's median offset from the step's entry, a name seen twice in a
    step counted as two marks, in the order of their medians; the wrapped calls put back afterwards."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks" / "dev"))
    import step_timeline

    runs = [
        [("entry", 1.0), ("scan>", 1.0 + 10e-6), ("graph_replay>", 1.0 + 20e-6), ("graph_replay>", 1.0 + 50e-6)],
        [("entry", 5.0), ("scan>", 5.0 + 30e-6), ("graph_replay>", 5.0 + 40e-6), ("graph_replay>", 5.0 + 90e-6)],
        [("entry", 9.0), ("scan>", 9.0 + 20e-6), ("graph_replay>", 9.0 + 25e-6)],
    ]
    got = step_timeline.medians(runs)
    assert [name for name, _ in got] == ["scan>", "graph_replay>", "graph_replay>#1"]
    assert [round(us, 6) for _, us in got] == [20.0, 25.0, 70.0]

    class Owner:
        @staticmethod
        def call(x):
            return 2 * x

    original = Owner.call
    timeline = step_timeline.Timeline()
    timeline.wrap(Owner, "call", "call")
    recorded = []
    step = timeline.timed(lambda: Owner.call(3), recorded)
    assert step() == 6 and Owner.call(1) == 2  # outside a timed step: no marks
    assert [name for name, _ in recorded[0]] == ["entry", "call>", "call<", "exit"]
    timeline.restore()
    assert Owner.call is original
