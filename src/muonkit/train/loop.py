"""Train the same model, on the same batches from the same seed, with several optimizers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..optim import Muon, param_groups
from .corpus import Corpus, sample_batch
from .model import GPT, GPTConfig

__all__ = ["DEFAULT_LR", "OPTIMIZERS", "RunResult", "make_optimizer", "steps_to_reach", "train_lm"]

OPTIMIZERS = ("muon", "adamw", "sgd", "muon_svd")

# Learning rates for the built-in LM task (see docs in train/__init__: how they were found).
DEFAULT_LR: dict[str, float] = {"muon": 0.02, "muon_svd": 0.02, "adamw": 3e-3, "sgd": 0.3}
ADAMW_PART_LR = 3e-3  # AdamW lr for the embeddings, head and 1-D parameters inside Muon runs


def make_optimizer(name: str, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of ``OPTIMIZERS``) for ``model``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else lr
    if name in ("muon", "muon_svd"):
        groups = param_groups(model, split={"*.qkv.weight": 3})
        method = "svd" if name == "muon_svd" else "newton_schulz"
        return Muon(groups, lr=lr, weight_decay=0.0, method=method, adamw_lr=ADAMW_PART_LR, adamw_betas=(0.9, 0.95))
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)


@dataclass
class RunResult:
    optimizer: str
    lr: float
    eval_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    eval_wall: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    loss = sum(model(x, y).item() for x, y in batches) / len(batches)
    model.train()
    return loss


def train_lm(
    name: str,
    cfg: GPTConfig,
    corpus: Corpus,
    *,
    steps: int,
    batch_size: int = 16,
    eval_every: int = 25,
    eval_batches: int = 8,
    seed: int = 0,
    lr: float | None = None,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train a fresh GPT (init from ``seed``) for ``steps`` steps with optimizer ``name``.

    Every run with the same seed sees the same initial weights, batches and validation batches.
    Wall-clock counts training steps only (evaluation excluded).
    """
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    lr = DEFAULT_LR[name] if lr is None else lr
    opt = make_optimizer(name, model, lr)
    result = RunResult(name, lr)
    data_gen = torch.Generator().manual_seed(seed + 1)
    val_gen = torch.Generator().manual_seed(seed + 2)
    val = []
    for _ in range(eval_batches):
        vx, vy = sample_batch(corpus.val, batch_size, cfg.ctx, val_gen)
        val.append((vx.to(device), vy.to(device)))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def record(step: int) -> None:
        result.eval_steps.append(step)
        result.val_loss.append(evaluate(model, val))
        result.eval_wall.append(result.train_seconds)

    record(0)
    for step in range(1, steps + 1):
        x, y = (t.to(device) for t in sample_batch(corpus.train, batch_size, cfg.ctx, data_gen))
        sync()
        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        result.train_seconds += t2 - t0
        result.optimizer_seconds += t2 - t1
        result.tokens += x.numel()
        result.train_loss.append(loss.item())
        if step % eval_every == 0 or step == steps:
            record(step)
        if on_step is not None:
            on_step(step, result.train_loss[-1])
    return result


def steps_to_reach(result: RunResult, target: float) -> tuple[int | None, float | None]:
    """First evaluated step (and its wall-clock) at which validation loss is <= ``target``."""
    for step, loss, wall in zip(result.eval_steps, result.val_loss, result.eval_wall):
        if loss <= target:
            return step, wall
    return None, None
