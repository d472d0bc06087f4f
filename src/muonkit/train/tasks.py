"""Training tasks for the demo: a byte-level language model and a CNN on 8x8 digits.

A task owns its data, builds a fresh model, draws training batches from a ``torch.Generator`` (whose
state is the data position saved in checkpoints) and evaluates on fixed validation batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .corpus import Corpus, sample_batch
from .model import GPT, GPTConfig

__all__ = ["DigitsCNN", "DigitsTask", "LMTask", "Task"]


class Task:
    """Interface shared by the demo tasks."""

    name: str
    batch_size: int
    device: str

    @property
    def lr_key(self) -> str:
        """Key of this task's tuned learning rates in ``optimizers.DEFAULT_LR``."""
        return self.name

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def train_batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def items_per_batch(self, x: Tensor) -> int:
        return x.numel()

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass
class LMTask(Task):
    """Next-byte prediction with a small GPT on a ``Corpus``."""

    corpus: Corpus
    cfg: GPTConfig
    batch_size: int = 16
    eval_batches: int = 8
    seed: int = 0
    device: str = "cpu"
    size: str = "custom"
    name: str = "lm"
    _val: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed + 2)
        need = self.cfg.ctx + 2
        if self.corpus.val.numel() < need or self.corpus.train.numel() < need:
            raise ValueError(f"the text is too short for context {self.cfg.ctx}: need > {need} bytes in each split")
        for _ in range(self.eval_batches):
            x, y = sample_batch(self.corpus.val, self.batch_size, self.cfg.ctx, gen)
            self._val.append((x.to(self.device), y.to(self.device)))

    @property
    def lr_key(self) -> str:
        return f"lm-{self.size}"

    def build_model(self) -> nn.Module:
        return GPT(self.cfg).to(self.device)

    def train_batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        x, y = sample_batch(self.corpus.train, self.batch_size, self.cfg.ctx, gen)
        return x.to(self.device), y.to(self.device)

    def _autocast(self) -> torch.autocast:
        # bf16 autocast on CUDA (weights, optimizer state and the loss stay fp32); plain fp32 on CPU.
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.startswith("cuda"))

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with self._autocast():
            return model(x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        with self._autocast():
            loss = sum(model(x, y).item() for x, y in self._val) / len(self._val)
        model.train()
        return {"val_loss": loss}

    def describe(self) -> dict[str, Any]:
        return {
            "task": "lm",
            "size": self.size,
            "model": dict(self.cfg.__dict__),
            "batch_size": self.batch_size,
            "tokens_per_step": self.batch_size * self.cfg.ctx,
            "train_tokens": self.corpus.train.numel(),
            "val_tokens": self.corpus.val.numel(),
            "sources": list(self.corpus.sources),
        }


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers, a hidden Linear and a classifier head, for 8x8 grey images."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(width // 2, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 128)
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.classifier(F.relu(self.fc(x.flatten(1))))


@dataclass
class DigitsTask(Task):
    """scikit-learn's bundled 8x8 digits (1,797 images): fixed 80/20 split from a seeded permutation."""

    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    name: str = "digits"

    def __post_init__(self) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise RuntimeError(
                "--task digits needs scikit-learn (it ships the 8x8 digits): pip install scikit-learn"
            ) from None
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        cut = int(0.8 * len(y))
        self.x_train, self.y_train = x[perm[:cut]].to(self.device), y[perm[:cut]].to(self.device)
        self.x_val, self.y_val = x[perm[cut:]].to(self.device), y[perm[cut:]].to(self.device)

    def build_model(self) -> nn.Module:
        return DigitsCNN().to(self.device)

    def train_batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(self.y_train), (self.batch_size,), generator=gen).to(self.device)
        return self.x_train[idx], self.y_train[idx]

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y)

    def items_per_batch(self, x: Tensor) -> int:
        return x.shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        logits = model(self.x_val)
        model.train()
        return {
            "val_loss": F.cross_entropy(logits, self.y_val).item(),
            "val_acc": (logits.argmax(-1) == self.y_val).float().mean().item(),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "task": "digits",
            "model": "DigitsCNN(width=32)",
            "batch_size": self.batch_size,
            "train_examples": len(self.y_train),
            "val_examples": len(self.y_val),
        }
