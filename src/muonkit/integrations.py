"""Muon in the trainers people already use: Hugging Face ``transformers.Trainer`` and PyTorch Lightning.

Neither library is a dependency of muonkit; these helpers import them only when called.

Hugging Face::

    from muonkit.integrations import hf_optimizers
    args = TrainingArguments(..., learning_rate=3e-4, weight_decay=0.01, warmup_steps=20)
    opt, sched = hf_optimizers(model, args, num_training_steps=1000, lr=0.02)
    Trainer(model=model, args=args, ..., optimizers=(opt, sched)).train()

``args.learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` configure the AdamW part
(embeddings, head, norms, biases) as they would configure plain AdamW; Muon's own ``lr`` (default 0.02)
and other ``Muon`` options are keyword arguments. The scheduler is ``transformers.get_scheduler`` with the
arguments' type and warmup: it scales every group, Muon and AdamW alike, by the same factor.

Lightning: return the optimizer from ``configure_optimizers`` (``lightning_optimizers`` adds a scheduler
in Lightning's dict format); ``Muon.step(closure)`` follows the ``torch.optim`` contract Lightning uses,
and ``gradient_clip_val`` clips before the step as with any optimizer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .optim import Muon, param_groups

__all__ = ["hf_optimizers", "lightning_optimizers", "muon_for"]


def muon_for(
    model: nn.Module,
    *,
    lr: float = 0.02,
    adamw_lr: float = 3e-4,
    weight_decay: float = 0.0,
    split: dict[str, Any] | None = None,
    **muon_kwargs: Any,
) -> Muon:
    """``Muon(param_groups(model, split=split), ...)``: hidden matrices Muon, everything else AdamW."""
    return Muon(param_groups(model, split=split), lr=lr, adamw_lr=adamw_lr, weight_decay=weight_decay, **muon_kwargs)


def hf_optimizers(
    model: nn.Module,
    args: Any,
    num_training_steps: int,
    *,
    lr: float = 0.02,
    split: dict[str, Any] | None = None,
    **muon_kwargs: Any,
) -> tuple[Muon, Any]:
    """``(optimizer, scheduler)`` for ``transformers.Trainer(optimizers=...)`` from its ``TrainingArguments``."""
    from transformers import get_scheduler

    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps!r}")
    muon_kwargs.setdefault("adamw_betas", (args.adam_beta1, args.adam_beta2))
    muon_kwargs.setdefault("adamw_eps", args.adam_epsilon)
    opt = muon_for(
        model, lr=lr, adamw_lr=args.learning_rate, weight_decay=args.weight_decay, split=split, **muon_kwargs
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=opt,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
    )
    return opt, scheduler


def lightning_optimizers(
    model: nn.Module, *, scheduler: Any = None, interval: str = "step", **muon_kwargs: Any
) -> dict[str, Any] | Muon:
    """What ``LightningModule.configure_optimizers`` returns: the optimizer, or with ``scheduler`` (a
    function ``optimizer -> torch.optim.lr_scheduler.LRScheduler``) Lightning's dict with that scheduler."""
    opt = muon_for(model, **muon_kwargs)
    if scheduler is None:
        return opt
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler(opt), "interval": interval}}
