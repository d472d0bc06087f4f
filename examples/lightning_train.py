"""Muon in a PyTorch Lightning module: ``configure_optimizers`` returns it (with a scheduler).

    pip install "muonkit[lightning]"
    python examples/lightning_train.py

Lightning calls ``optimizer.step(closure)`` and clips gradients (``gradient_clip_val``) before it, as for
any torch optimizer; AMP via ``precision="bf16-mixed"`` needs nothing from muonkit either.
"""

from __future__ import annotations

import lightning as L
import torch

from muonkit.integrations import lightning_optimizers
from muonkit.train import GPT, SIZES, builtin_corpus
from muonkit.train.corpus import sample_batch


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, ctx: int):
        self.train = builtin_corpus().train
        self.ctx = ctx

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        while True:
            x, y = sample_batch(self.train, 1, self.ctx, gen)
            yield x[0], y[0]


class LitGPT(L.LightningModule):
    def __init__(self, size: str = "tiny"):
        super().__init__()
        self.cfg = SIZES[size]
        self.model = GPT(self.cfg)

    def training_step(self, batch, _):
        x, y = batch
        loss = self.model(x, y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # fused qkv rows are orthogonalized as three matrices; cosine decay over the run
        return lightning_optimizers(
            self.model,
            lr=0.02,
            adamw_lr=1e-3,
            split={"*.qkv.weight": 3},
            scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200),
        )


def main() -> None:
    torch.manual_seed(0)
    module = LitGPT()
    trainer = L.Trainer(max_steps=200, gradient_clip_val=1.0, logger=False, enable_checkpointing=False)
    trainer.fit(module, torch.utils.data.DataLoader(Batches(module.cfg.ctx), batch_size=16))


if __name__ == "__main__":
    main()
