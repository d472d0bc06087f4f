"""The orthogonalization calls the optimizer makes, each run eagerly or replayed from a cached CUDA graph
(``muonkit.accel.cuda_graphs``): ``NSCall.run`` (a checked batch), ``orthogonalize_stack`` (same-shape
parts stacked straight into a graph's input), ``orthogonalize_filled`` (an input a fused kernel writes)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..accel import cuda_graphs, kernels
from .iteration import Restarts, _frobenius_normalise, _iterate, restart_positions

__all__ = ["NSCall", "filled_graph_key", "orthogonalize_filled", "orthogonalize_stack"]


def orthogonalize_stack(parts: Sequence[Tensor], call: NSCall) -> Tensor:
    """``call.run(torch.stack(parts))`` for same-shape ``parts`` (``(..., m, n)`` each), returned as ``(b, m, n)``
    with ``fresh=False`` semantics (``NSCall.run``). When a cached CUDA graph replays the call, the parts are
    stacked straight into its static input (one copy fewer than stacking first)."""
    m, n = parts[0].shape[-2:]
    stack_shape = (len(parts), *parts[0].shape)
    b = math.prod(stack_shape[:-2])
    if any(p.requires_grad for p in parts) and torch.is_grad_enabled():
        return call.eager(torch.stack(list(parts)).reshape(b, m, n))

    def fill(X: Tensor) -> None:
        torch.stack(list(parts), out=X.view(stack_shape))

    return call.filled(fill, (b, m, n), parts[0].dtype, parts[0].device)


def orthogonalize_filled(
    fill: Callable[..., object],
    shape: tuple[int, int, int],
    rows: Sequence[Sequence[float]],
    ns_dtype: torch.dtype,
    device: torch.device,
    method: str = "auto",
    restarts: Restarts = None,
    unnormalised: bool = False,
) -> Tensor:
    """NS on a ``(b, m, n)`` batch, ``m <= n``, that ``fill(X)`` writes into ``X`` (``ns_dtype``) already
    normalised (every singular value in ``(0, 1]``; the fused momentum kernel does that). Returned with
    ``fresh=False`` semantics: on a cached CUDA graph, ``fill`` writes straight into its static input.

    ``unnormalised``: ``fill(X, d)`` writes the input undivided into ``X`` and each matrix's divisor into ``d``
    (float32, ``(b,)``); NS works on ``X / d`` without a pass that divides ``X`` (the divisors go into the
    first products' float32 epilogues). For ``ns_dtype`` with float32's range (bf16, float32), and inside a
    captured sequence or where graphs are off: no cached NS graph is used."""
    if shape[-2] > shape[-1]:
        raise ValueError(f"orthogonalize_filled needs m <= n, got {shape}")
    if unnormalised:
        held = [torch.empty(shape, dtype=ns_dtype, device=device)]
        d = torch.empty(shape[0], dtype=torch.float32, device=device)
        positions = restart_positions(restarts, len(rows))
        fill(held[0], d)
        return _iterate(held.pop(), rows, method, positions, d)  # handed over: freed once NS has spent it
    return NSCall.prenormalised_call(rows, ns_dtype, method, restarts).filled(fill, shape, ns_dtype, device)


def filled_graph_key(
    shape: tuple[int, int, int], rows: Sequence[Sequence[float]], ns_dtype: torch.dtype, device: torch.device,
    method: str = "auto", restarts: Restarts = None,
) -> tuple:  # fmt: skip
    """The ``cuda_graphs.cache`` key of the graph :func:`orthogonalize_filled` replays for these arguments (on the
    current stream)."""
    return NSCall.prenormalised_call(rows, ns_dtype, method, restarts).key(shape, ns_dtype, device)


@dataclass(frozen=True)
class NSCall:
    """What an NS call computes, apart from its input (``NSCall.of(rows, norm_scale, eps, ns_dtype, method,
    restarts)``, checked by the caller): ``run`` it on a ``(b, m, n)`` batch, eagerly or from its CUDA graph.
    Gram NS is used only for rectangular matrices: on square ones it saves nothing."""

    rows: tuple[tuple[float, ...], ...]
    norm_scale: float
    eps: float
    ns_dtype: torch.dtype
    method: str
    restarts: tuple[int, ...]
    prenormalised: bool = False  # the input is already normalised, in ns_dtype, with m <= n

    @classmethod
    def of(cls, rows: Sequence[Sequence[float]], norm_scale: float, eps: float, ns_dtype: torch.dtype,
           method: str, restarts: Restarts, prenormalised: bool = False) -> NSCall:  # fmt: skip
        rows_ = tuple(tuple(float(c) for c in r) for r in rows)
        return cls(rows_, norm_scale, eps, ns_dtype, method, restart_positions(restarts, len(rows_)), prenormalised)

    @classmethod
    def prenormalised_call(cls, rows: Sequence[Sequence[float]], ns_dtype: torch.dtype, method: str,
                           restarts: Restarts) -> NSCall:  # fmt: skip
        """The call ``orthogonalize_filled`` makes: input already normalised in ``ns_dtype``, ``m <= n``."""
        return cls.of(rows, 1.0, 0.0, ns_dtype, method, restarts, prenormalised=True)

    def key(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> tuple:
        """The graph-cache key of this call on an input of ``shape``, ``dtype`` on ``device`` (current stream)."""
        return (device, cuda_graphs.stream_key(device), tuple(shape), dtype, self, kernels.get_mode())

    def graphed(self, G: Tensor) -> cuda_graphs.Graphed | None:
        """The cached CUDA graph of this call on ``G`` (captured on first use), or ``None`` to run it eagerly."""
        b, m, n = G.shape
        k = min(m, n)
        itemsize = torch.empty((), dtype=self.ns_dtype).element_size()
        estimate = G.nbytes + 3 * b * (m * n + k * k) * itemsize  # static input + X, A, P and the next X
        build = functools.partial(cuda_graphs.capture, self.eager, G, warmup=kernels.capture_warmup)
        return cuda_graphs.cache.get(self.key(G.shape, G.dtype, G.device), estimate, build)

    def filled(self, fill: Callable[[Tensor], object], shape: tuple[int, int, int], dtype: torch.dtype,
               device: torch.device) -> Tensor:  # fmt: skip
        """This call on the ``(b, m, n)`` input that ``fill(X)`` writes; ``fresh=False`` semantics. A cached
        graph's static input is filled directly; otherwise a new tensor is, then ``run``."""
        if cuda_graphs.graphable_on(device):
            entry = cuda_graphs.cache.peek(self.key(shape, dtype, device))
            if entry is not None:
                fill(entry.input)
                entry.graph.replay()
                return entry.output
        X = torch.empty(shape, dtype=dtype, device=device)
        fill(X)
        return self.run(X)

    def run(self, G: Tensor, fresh: bool = False) -> Tensor:
        """This call on ``G`` (``(b, m, n)``; returns ``ns_dtype``): a cached graph's replay where allowed, else
        eagerly. Unless ``fresh``, the result may be the graph's static output, valid only until the next call of
        the same shape on the same stream (for callers that consume it at once)."""
        if cuda_graphs.graphable(G):
            entry = self.graphed(G)
            if entry is not None:
                out = entry.run(G)
                return out.clone() if fresh else out
        return self.eager(G)

    def eager(self, G: Tensor) -> Tensor:
        if self.prenormalised:
            return _iterate(G, self.rows, self.method, self.restarts)
        return _orthogonalize_eager(G, self.rows, self.norm_scale, self.eps, self.ns_dtype, self.method, self.restarts)


def _orthogonalize_eager(
    G: Tensor,
    rows: Sequence[Sequence[float]],
    norm_scale: float,
    eps: float,
    ns_dtype: torch.dtype,
    method: str,
    restarts: Sequence[int],
) -> Tensor:
    transposed = G.shape[-2] > G.shape[-1]
    if transposed:
        G = G.mT
    X = _iterate(_frobenius_normalise(G, norm_scale, eps, ns_dtype), rows, method, restarts)
    return X.mT if transposed else X
