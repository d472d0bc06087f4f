"""The AdamW groups of a ``Muon`` (embeddings, head, 1-D parameters): their state, made on first use, and one step."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor

from ..accel import fused
from .loading import _static
from .options import as_numbers
from .shards import locals_of
from .stages import adamw_step, fused_adamw_applies

__all__ = ["adamw_group"]


def adamw_group(
    state: MutableMapping[Tensor, dict[str, Any]], group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
    found_inf: Tensor | None = None, counts: Tensor | None = None,
) -> None:  # fmt: skip
    """One AdamW step of ``group`` over ``params`` (those with a gradient), its state in ``state`` (the optimizer's,
    made here on first use); on CUDA with acceleration on, torch's fused AdamW kernel, which leaves everything as it
    was where ``found_inf`` is nonzero (``stages.adamw_step``; ``counts``: its argument)."""
    exp_avgs, exp_avg_sqs, steps = [], [], []
    for p in params:
        st = state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            _static(st["exp_avg"], st["exp_avg_sq"])
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    adamw_step(  # elementwise: sharded tensors take the step on their local shards
        locals_of(params),
        locals_of(grads),
        locals_of(exp_avgs),
        locals_of(exp_avg_sqs),
        steps,
        **as_numbers({"lr": group["lr"], "weight_decay": group["weight_decay"]}),
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        fused=fused.fused_enabled() and fused_adamw_applies(params, grads),
        found_inf=found_inf,
        counts=counts,
    )
