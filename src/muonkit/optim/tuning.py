"""Tuning the Triton kernel for an optimizer's NS batches when it is built (``Muon(..., accel=True)`` on CUDA):
which batches the step will form (``merged_ns_batches``, ``stages.ns_batches``) and timing the tile sizes for
them (``accel.kernels.pretune``). The cost is stated in ``Muon``'s docstring and ``docs/performance.md``."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..accel import kernels
from ..coefficients import as_preset
from ..newton_schulz import default_ns_dtype
from .options import NS_OPTIONS, step_options
from .parts import matrix_offsets, split_axes
from .plans import batch_sizes, merge_key
from .shards import is_sharded
from .stages import ns_batches

if TYPE_CHECKING:
    from .muon import Muon

__all__ = ["merged_ns_batches", "pretune"]


def pretune(opt: Muon) -> None:
    """Time the Triton kernel's tile sizes for this optimizer's NS batches now, eagerly: inside a
    ``torch.compile``'d or graph-captured step no timing is possible (single-process batches; sharded
    parameters' batches are tuned when first run eagerly, or take the default)."""
    merged: dict[tuple[torch.device, torch.dtype], list] = defaultdict(list)  # muon_steps' shared batches
    for group in opt.param_groups:
        if group["algorithm"] != "muon":
            continue
        by_device: dict[torch.device, list[tuple[int, ...]]] = {}
        for p in group["params"]:
            if p.is_cuda and not is_sharded(p):
                by_device.setdefault(p.device, []).append(tuple(p.shape))
        for device, shapes in by_device.items():
            work = group["ns_dtype"] or default_ns_dtype(device, torch.float32)
            if opt.executor is None and group["method"] != "svd" and split_axes(group["split"])[1] is None:
                merged[(device, work)].append((shapes, step_options(group)))
                continue
            batches = ns_batches(
                shapes,
                matrix_view=group["matrix_view"],
                split=group["split"],
                max_batch=group.get("max_batch"),
                parts=getattr(opt.executor, "parts", 1),
            )
            kernels.pretune(batches, work, device)
    for (device, work), calls in merged.items():
        kernels.pretune(merged_ns_batches(calls, work), work, device)


def merged_ns_batches(
    calls: Sequence[tuple[Sequence[Sequence[int]], dict[str, Any]]], work: torch.dtype
) -> list[tuple[int, int, int]]:
    """``(b, m, n)``, ``m <= n``, of every NS batch ``muon_steps`` forms on the fused path for calls with parameters
    of these ``shapes`` and these ``options`` (``(shapes, options)`` per call) in NS precision ``work``. What the
    kernel tuner prepares for."""
    counts: dict[tuple, int] = defaultdict(int)
    for shapes, options in calls:
        opts = {**NS_OPTIONS, **options}
        schedule = tuple(tuple(r) for r in as_preset(opts["coefficients"]).schedule(opts["ns_steps"]))
        for shape in shapes:
            for r, c, offsets in matrix_offsets(shape, opts["matrix_view"], opts["split"]):
                if r and c:
                    counts[merge_key(r, c, work, schedule, opts)] += len(offsets)
    total = sum(count * key[0] * key[1] for key, count in counts.items())
    batches = []
    for (m, n, *_, max_batch), count in counts.items():
        batches += [(size, m, n) for size in batch_sizes(count, m, n, max_batch, total)]
    return batches
