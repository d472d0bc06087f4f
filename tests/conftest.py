"""Shared test helpers: matrices with a prescribed spectrum and the scalar NS map."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (where Triton is installed) run in its interpreter on CPU tensors: test_fused checks them
    # so. Triton reads this when it is first imported, so it is set before any test module imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Timed tile choices stay in memory: no test reads another run's or writes the user's cache (test_tile_cache
# points it at a temporary directory where it tests the file).
os.environ["MUONKIT_CACHE_DIR"] = "off"


def matrix_with_spectrum(m: int, n: int, sigmas, *, batch=(), seed: int = 0, dtype=torch.float64):
    """Random U diag(sigmas) V^T of shape (*batch, m, n); len(sigmas) == min(m, n)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
    assert s.numel() == k
    U, _ = torch.linalg.qr(torch.randn(*batch, m, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(*batch, n, k, generator=gen, dtype=torch.float64))
    return ((U * s) @ V.mT).to(dtype)


def assert_cuda_steps_match_cpu(shapes, groups=lambda params: params, seed: int = 4, **options):
    """Three Muon steps (lr 0.05, float32 NS, plain NS, ``options``) of the same gradients on the CPU and on CUDA, the
    parameters of ``shapes`` grouped by ``groups(params)``: the weights agree to float32 rounding."""
    from muonkit import Muon

    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    results = []
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(p.clone().to(device)) for p in start]
        opt = Muon(groups(params), lr=0.05, ns_dtype=torch.float32, method="newton_schulz", **options)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.to(device)
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def upper_only(T, tile: int):
    """``T`` with every entry outside the ``tile x tile`` blocks on and above the diagonal replaced by NaN:
    upper-tile storage (``kernels.sym_product(upper_out=True)``) as its consumers must take it, so that any
    read of an unwritten entry shows."""
    r = torch.arange(T.shape[-1], device=T.device) // tile
    return T.masked_fill(r[:, None] > r[None, :], float("nan"))


def stand_in_timing(monkeypatch, ms_of):
    """CPU stand-ins for the kernel tuner's CUDA timing (``accel.kernels._tune``): no capture under way, no tuned
    shapes yet, and events whose elapsed time is ``ms_of()`` (the milliseconds of the configuration run last)."""
    from muonkit.accel import kernels

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(kernels, "_best", {})

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return ms_of()

    monkeypatch.setattr(torch.cuda, "Event", Event)


def scalar_phi(rows, x):
    """Compose the odd polynomials of ``rows`` on the scalars ``x`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    for row in rows:
        x2 = x * x
        acc = np.zeros_like(x)
        for coef in reversed(row):
            acc = acc * x2 + coef
        x = x * acc
    return x


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
