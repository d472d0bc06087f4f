"""Muon inside Hugging Face Trainer and PyTorch Lightning (CPU, tiny randomly initialised models, no downloads)."""

import functools
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import muonkit
from muonkit.integrations import hf_optimizers, lightning_optimizers

VOCAB, CTX = 64, 16  # as in examples/hf_trainer.py
ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _example():
    """examples/hf_trainer.py, imported: its toy dataset is the one these tests train on."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("hf_trainer_example", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def Sequences(n=256):
    return _example().Sequences(n)


def _llama():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    return transformers, _example().tiny_llama(hidden_size=32)


def test_hf_trainer_trains_with_muon_and_its_scheduler(tmp_path):
    transformers, model = _llama()
    steps = 40
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        weight_decay=0.01,
        warmup_steps=5,
        lr_scheduler_type="linear",
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    opt, sched = hf_optimizers(model, args, num_training_steps=steps, lr=0.02)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(), optimizers=(opt, sched))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt  # accelerate wraps it
    assert losses[-1] < 0.7 * losses[0], losses
    # both kinds of group exist and the linear schedule took every group's lr to 0 at the last step
    kinds = {g["algorithm"] for g in opt.param_groups}
    assert kinds == {"muon", "adamw"}
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in opt.param_groups)
    adamw = next(g for g in opt.param_groups if g["algorithm"] == "adamw")
    assert adamw["initial_lr"] == 3e-3 and adamw["weight_decay"] == 0.01
    assert any("momentum_buffer" in opt.state[p] for g in opt.param_groups for p in g["params"])


def test_lightning_module_with_muon_clipping_and_scheduler():
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(VOCAB, 32)
            self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, VOCAB)
            self.losses = []

        def training_step(self, batch, _):
            x = batch["input_ids"]
            logits = self.head(self.body(self.emb(x[:, :-1])))
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return lightning_optimizers(
                self, lr=0.02, adamw_lr=3e-3, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 20, 0.5)
            )

    module = Module()
    trainer = L.Trainer(
        max_steps=60,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Sequences(), batch_size=16, shuffle=True))
    opt = trainer.optimizers[0]
    assert isinstance(opt, muonkit.Muon)
    assert sum(module.losses[-5:]) / 5 < 0.6 * module.losses[0], module.losses[::10]
    muon_group = next(g for g in opt.param_groups if g["algorithm"] == "muon")
    assert muon_group["lr"] == pytest.approx(0.02 * 0.5**3)  # StepLR stepped every 20 optimizer steps
    assert all("momentum_buffer" in opt.state[p] for p in muon_group["params"])
