"""Replay eager Newton-Schulz calls on CUDA from captured CUDA graphs.

An NS5 call launches a few dozen small kernels; for the matrix sizes of a typical transformer the GPU
finishes each one faster than Python and the CUDA driver can launch the next, so an eager call is
launch-bound (an H100 ran 8 x 768^2 eagerly in 1.04 ms, about four times its GPU time). The first eager
call for a given (device, stream, shape, dtype, schedule) is therefore captured into a CUDA graph; later
calls copy their input into the graph's static input tensor and replay it: one launch per call.

What it costs: each cached graph keeps its static input and its memory pool (its intermediate tensors)
allocated for as long as it stays cached; the whole-batch sequences of the fused step (``Replays``) share one
pool per device and stream. The cache is bounded by ``max_bytes`` (least recently
used graphs are dropped first; a call whose graph alone would exceed the bound runs eagerly), and holds
graphs only for the calls made so far. It is not used inside ``torch.compile``, under an enclosing graph
capture, for inputs that need autograd, or when disabled (``muonkit.accel.disabled()``, ``Muon(accel=False)``,
or ``set_cuda_graphs(False)`` alone). Graphs are keyed by CUDA stream, so calls on different streams never
share buffers; concurrent calls from several threads on one stream are not supported.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GraphCache",
    "Graphed",
    "Key",
    "Replays",
    "cache",
    "cuda_graphs_enabled",
    "graphable",
    "graphable_on",
    "replays",
    "set_cuda_graphs",
]

DEFAULT_MAX_BYTES = 2 * 1024**3


@dataclass
class Graphed:
    """One captured call: ``run(x)`` copies ``x`` into ``input``, replays, returns the static ``output``."""

    input: Tensor
    output: Tensor
    graph: Any  # torch.cuda.CUDAGraph (or a stand-in in tests)
    nbytes: int
    values: list[float] | None = None  # ``Replays``: the numbers ``input`` holds now

    def run(self, x: Tensor) -> Tensor:
        self.input.copy_(x)
        self.graph.replay()
        return self.output


def capture(fn: Callable[[Tensor], Tensor], example: Tensor, warmup: Callable[[], Any] | None = None) -> Graphed:
    """Capture ``fn`` applied to a static copy of ``example`` into a CUDA graph (after warm-up on a side stream).

    ``warmup`` is a context-manager factory active during the warm-up calls (the Triton kernel uses it to
    time its tile sizes for this shape before capture, where no timing is possible).
    """
    device = example.device
    static = torch.empty(example.shape, dtype=example.dtype, device=device)
    static.copy_(example)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), warmup() if warmup else contextlib.nullcontext():
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream(device).wait_stream(side)
    return _capture_on(fn, static)


def _capture_on(fn: Callable[[Tensor], Any], static: Tensor, pool: Any = None) -> Graphed:
    """``fn(static)`` captured into a CUDA graph, its size counted as ``static`` plus what its memory pool grew
    (a private pool, or ``pool``, shared with other graphs: ``Replays``)."""
    device = static.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # as torch.cuda.graph does on entry: what stays reserved after it is the pool
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn(static)
    grown = max(0, torch.cuda.memory_reserved(device) - reserved)
    return Graphed(static, output, graph, static.nbytes + grown)


class Key(tuple):
    """A tuple whose hash is computed once: a key looked up several times every step (``Replays.run``) whose
    nested parts (a batch's matrix locations) would otherwise be hashed again at each lookup."""

    _hash: int

    def __new__(cls, items: Any) -> Key:
        self = super().__new__(cls, items)
        self._hash = tuple.__hash__(self)
        return self

    def __hash__(self) -> int:
        return self._hash


class GraphCache:
    """Least-recently-used graphs, at most ``max_bytes`` together (as counted by ``Graphed.nbytes``)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, Graphed] = OrderedDict()
        self._failed: set[Hashable] = set()
        self._evictions: dict[Hashable, int] = {}  # how often each key's graph was dropped for room

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._failed.clear()
        self._evictions.clear()
        if self is cache:
            replays.clear()

    def failed(self, key: Hashable) -> bool:
        """Whether capturing ``key``'s graph failed before (its calls run eagerly)."""
        return key in self._failed

    def discard(self, key: Hashable) -> None:
        """Drop the graph for ``key``, if cached."""
        self._entries.pop(key, None)

    def peek(self, key: Hashable) -> Graphed | None:
        """The cached graph for ``key`` if there is one (marked as used), without building it."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def get(self, key: Hashable, estimate: int, build: Callable[[], Graphed]) -> Graphed | None:
        """The cached graph for ``key``, built on first use; ``None`` (run eagerly) when the estimated
        size alone exceeds the bound or the capture failed before. Graphs that do not fit together take turns
        at most twice each: a graph already dropped twice for room is not captured again while it would
        need room (its calls run eagerly), so that a working set larger than the bound does not recapture
        every step (measured on an H100: the 1B-parameter set's step without the QKV split took 105 ms that
        way, 55.7 ms with this rule)."""
        entry = self.peek(key)
        if entry is not None:
            return entry
        if key in self._failed or estimate > self.max_bytes:
            return None
        if self._evictions.get(key, 0) >= 2 and self.nbytes + estimate > self.max_bytes:
            self._failed.add(key)
            return None
        self._evict(self.max_bytes - estimate)
        try:
            entry = build()
        except RuntimeError:  # an op that cannot be captured here: remember, run eagerly from now on
            self._failed.add(key)
            return None
        if entry.nbytes > self.max_bytes:  # measured larger than estimated: never worth rebuilding
            self._failed.add(key)
            return None
        self._entries[key] = entry
        self._evict(self.max_bytes)
        return entry

    def _evict(self, budget: int) -> None:
        """Drop least recently used graphs until the rest take at most ``budget`` bytes."""
        while self._entries and self.nbytes > max(budget, 0):
            key, _ = self._entries.popitem(last=False)
            self._evictions[key] = self._evictions.get(key, 0) + 1


class Replays:
    """Whole side-effecting sequences (a fused Muon batch: momentum, NS, update) replayed from CUDA graphs.

    Such a sequence reads and writes tensors at fixed addresses (gradients, momentum buffers, parameters) and
    takes its changing numbers (learning rate, momentum) from a small device tensor, ``scalars``. It cannot be
    warmed up by running it on a copy, so :meth:`run` runs it eagerly until it sees a ``slot`` (what the sequence
    computes) with ``addresses`` it saw on one of the slot's recent calls; then it captures it (the eager run
    before compiled and tuned every kernel) and from then on replays it for those addresses. Two optimizers of one
    structure stepped in turns (each its own addresses, one slot) so get a graph each. Where the addresses never
    come back (tensors reallocated elsewhere every step), every call runs eagerly; after ``max_captures``
    captures of one slot it stops capturing that slot.

    The sequences captured for one device and stream share one memory pool (``_pools``): a sequence keeps nothing
    in it from one replay to the next (it writes only tensors allocated outside the capture), and the stream runs
    the replays one after another, so each reuses the others' scratch memory. The graphs of a step then hold the
    intermediates of its largest batch, not of every batch together.
    """

    def __init__(self, max_captures: int = 8) -> None:
        self.max_captures = max_captures
        self._recent: dict[Hashable, list[Hashable]] = {}  # per slot, the addresses of its last calls, newest last
        self._captures: dict[Hashable, int] = {}
        self._pools: dict[tuple[torch.device, tuple[int, int]], Any] = {}

    def clear(self) -> None:
        self._recent.clear()
        self._captures.clear()
        self._pools.clear()

    def run(self, slot: Hashable, addresses: Hashable, values: list[float], fn: Callable[[Tensor], Any],
            device: torch.device, estimate: int, replaces: Hashable = None) -> None:  # fmt: skip
        """``fn(scalars)`` with ``scalars`` a float32 tensor of ``values`` on ``device``: replayed, captured or
        eager (see the class). ``estimate``: bytes the graph's memory pool will take, for the cache's bound;
        ``replaces``: the key of a cached graph that a capture makes unnecessary (dropped to free its memory)."""
        key = ("replay", slot, addresses)
        entry = cache.peek(key)
        if entry is None:
            recent = self._recent.setdefault(slot, [])
            repeated = addresses in recent and not cache.failed(key)
            if repeated and self._captures.get(slot, 0) < self.max_captures:
                self._captures[slot] = self._captures.get(slot, 0) + 1
                if replaces is not None:
                    cache.discard(replaces)
                entry = cache.get(key, estimate, lambda: _capture_effect(fn, len(values), device, self._pools))
            if addresses in recent:
                recent.remove(addresses)
            recent.append(addresses)
            del recent[: -2 * self.max_captures]
        if entry is None:
            scalars = torch.empty(len(values), dtype=torch.float32, device=device)
            scalars.copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)  # pageable: staged, no sync
            fn(scalars)
            return
        if entry.values != values:  # new numbers (a schedule); else the graph's input still holds them
            entry.input.copy_(torch.tensor(values, dtype=torch.float32), non_blocking=True)
            entry.values = values
        entry.graph.replay()


def _capture_effect(fn: Callable[[Tensor], Any], n: int, device: torch.device, pools: dict | None = None) -> Graphed:
    """``fn(scalars)`` captured, with ``scalars`` a static float32 tensor of ``n`` values (the graph's input), into
    the memory pool ``pools`` holds for the device's current stream (made on first use; ``None``: a private one)."""
    pool = None
    if pools is not None:
        key = (device, stream_key(device))
        pool = pools.get(key)
        if pool is None:
            pool = pools[key] = torch.cuda.graph_pool_handle()
    return _capture_on(fn, torch.zeros(n, dtype=torch.float32, device=device), pool)


_enabled = True
cache = GraphCache()
replays = Replays()


def set_cuda_graphs(enabled: bool, max_bytes: int | None = None) -> None:
    """Turn graph replay of eager NS calls on or off, and optionally set the cache's size bound in bytes.

    Turning it off (or lowering the bound) drops the cached graphs that no longer fit.
    """
    global _enabled
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        cache.max_bytes = max_bytes
        cache._evict(max_bytes)
    _enabled = bool(enabled)
    if not _enabled:
        cache.clear()


def cuda_graphs_enabled() -> bool:
    return _enabled


def graphable_on(device: torch.device) -> bool:
    """Whether NS calls on ``device`` may replay cached graphs now: enabled, CUDA, eager (not compiling, not
    inside another capture)."""
    if not (_enabled and device.type == "cuda"):
        return False
    return not (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing())


def graphable(x: Tensor) -> bool:
    """Whether an NS call on ``x`` may replay a cached graph: :func:`graphable_on` its device, and no autograd
    through it."""
    return graphable_on(x.device) and not (x.requires_grad and torch.is_grad_enabled())


def stream_id(stream: torch.cuda.Stream) -> tuple[int, int]:
    """What identifies ``stream`` in a cache key."""
    return (stream.device_index, stream.stream_id)


def stream_key(device: torch.device) -> tuple[int, int]:
    """What identifies the current stream of ``device`` in a cache key: ``stream_id(current_stream(device))``, read
    without making the ``Stream`` object where torch has the call that ``torch.cuda.current_stream`` makes (0.2-0.3
    us against 5-8 us on an H200's host; a repeated step reads it every step)."""
    if _current_stream is None or device.index is None:
        return stream_id(torch.cuda.current_stream(device))
    stream, index, _ = _current_stream(device.index)
    return (index, stream)


_current_stream = getattr(torch._C, "_cuda_getCurrentStream", None)  # (stream id, device index, device type)
