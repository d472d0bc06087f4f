"""Whether a step's gradients hold NaN or Inf, found on the GPU by one kernel per dtype, replayed from a CUDA graph.

The multi-tensor form (``optim.stages.finite_on_device``: an inf-norm per gradient, stacked, compared) is one
launch of the norm kernel but a dozen more around it, and its host work grows with the number of gradients: 1.1 ms
before a 12 x 768 GPT's first graph launch on an H200, while the GPU waited (``benchmarks/train_loop.py
--profile``). :class:`FiniteScan` does the same check with the host work of a CUDA-graph replay: the gradients are
read through a table of their addresses in device memory (rewritten only where a loop's gradients moved, as the
fused step's own table is), the tensors are cut into chunks of ``CHUNK`` entries fixed once for their shapes, and
each chunk's program writes whether its entries are all finite and, where one is not, sets the step's ``found_inf``
flag (``optim.nonfinite``). The per-chunk results name the gradients only where the flag was set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import cuda_graphs, fused

__all__ = ["CHUNK", "FiniteScan"]

CHUNK = 1 << 16  # entries per program: 1300 programs for the 85M of a 12 x 768 GPT
_BLOCK = 2048
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class _Launch(NamedTuple):
    """The kernel launch over one dtype's gradients."""

    dtype: torch.dtype
    owner: Tensor  # per chunk: its gradient's position in the scan's list (int32)
    start: Tensor  # per chunk: its first entry (int64)
    ok: Tensor  # its chunks' part of ``FiniteScan.ok``


class FiniteScan:
    """The check over gradients of fixed shapes and dtypes on one device: :meth:`run` with the current gradients.

    ``flag``: the float32 one-element tensor the step's kernels read (``optim.nonfinite.found_inf_flag``), set to
    1 where an entry is not finite, else 0. ``owners``: per entry of :meth:`run`'s result, which gradient (its
    index in the list) it covers. Made only where :meth:`applies`."""

    def __init__(self, grads: Sequence[Tensor], flag: Tensor, chunk: int = CHUNK) -> None:
        if not self.applies(grads) or flag.device != grads[0].device:
            raise ValueError("FiniteScan needs dense float gradients on one device, and the flag on that device")
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
        self.device, self.flag, self.chunk = flag.device, flag, chunk
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            if g.numel():
                by_dtype.setdefault(g.dtype, []).append(i)
        chunks = [(dtype, [(i, s) for i in index for s in range(0, grads[i].numel(), chunk)])
                  for dtype, index in by_dtype.items()]  # fmt: skip
        self.owners = [i for _, cs in chunks for i, _ in cs]
        self.ok = torch.ones(len(self.owners), dtype=torch.int8, device=self.device)
        self._table = fused.AddressTable(len(grads), self.device)
        self._numel = torch.tensor([g.numel() for g in grads], dtype=torch.int64).to(self.device)
        self._launches: list[_Launch] = []
        first = 0
        for dtype, cs in chunks:
            owner, start = zip(*cs)
            self._launches.append(_Launch(
                dtype, torch.tensor(owner, dtype=torch.int32).to(self.device),
                torch.tensor(start, dtype=torch.int64).to(self.device), self.ok[first : first + len(cs)],
            ))  # fmt: skip
            first += len(cs)
        # what a captured graph of the kernels reads and writes besides the gradients (which the table names)
        held = [self.flag, self.ok, self._table.table, self._numel]
        held += [t for launch in self._launches for t in (launch.owner, launch.start)]
        self._targets = tuple(t.data_ptr() for t in held)
        # this scan's own slot (its result's address in it), so its own count of captures in ``cuda_graphs.Replays``:
        # optimizers that come and go in one process do not use up one slot's ``max_captures``
        self._slot = ("finite_scan", self.device, chunk, self.ok.data_ptr(),
                      tuple((tuple(g.shape), g.dtype) for g in grads))  # fmt: skip
        self._keys: dict[tuple[int, int], cuda_graphs.Key] = {}  # per stream: its slot, hashed once

    @staticmethod
    def applies(grads: Sequence[Tensor]) -> bool:
        """Whether the kernel can read ``grads``: some, all on one CUDA or (Triton's interpreter) CPU device, each
        filling its ``numel`` entries from its ``data_ptr`` (dense), of a float dtype it takes."""
        if not grads or fused._build() is None:
            return False
        device = grads[0].device
        return all(g.device == device and g.dtype in _DTYPES and g.layout == torch.strided and _dense(g) for g in grads)

    def run(self, grads: Sequence[Tensor], stream: tuple[int, int] | None = None,
            ptrs: list[int] | None = None) -> Tensor:  # fmt: skip
        """Check ``grads`` (the shapes and dtypes this scan was made for): the int8 per-chunk results (1: finite;
        ``owners`` says whose) and the flag are written on the device, in stream order, with no host sync.
        ``stream``: the device's current stream (``cuda_graphs.stream_key``) where graphs may replay, to replay
        the kernels from one (captured on the second call); else they are launched. ``ptrs``: the gradients'
        ``data_ptr()``, where the caller has read them."""
        if ptrs is None:
            ptrs = [g.data_ptr() for g in grads]
        self._table.update(ptrs)  # a loop that frees its gradients gets them elsewhere
        if stream is None:
            self._launch()
        else:
            slot = self._keys.get(stream)
            if slot is None:
                slot = self._keys[stream] = cuda_graphs.Key((*self._slot, stream))
            cuda_graphs.replays.run(slot, self._targets, [], lambda _: self._launch(), self.device, 0)
        return self.ok

    def _launch(self) -> None:
        kernel = fused._build().finite
        self.flag.zero_()
        for launch in self._launches:
            kernel(self._table.table, launch.owner, launch.start, self._numel, launch.ok, self.flag, launch.dtype,
                   self.chunk, min(self.chunk, _BLOCK))  # fmt: skip


def _dense(t: Tensor) -> bool:
    """Whether ``t``'s entries fill its ``numel`` places from ``data_ptr`` (contiguous in some order of its
    dimensions: a channels-last gradient too)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride != expected:
            return False
        expected *= size
    return True
