"""Muon with the Hugging Face Trainer: a tiny randomly initialised Llama learns a toy language (no downloads).

    pip install "muonkit[hf]"          # transformers + accelerate
    python examples/hf_trainer.py

``hf_optimizers`` builds Muon (hidden matrices) + AdamW (embeddings, tied head, norms) from the
TrainingArguments: ``learning_rate``, ``weight_decay``, ``adam_*`` configure the AdamW part; Muon's lr is
its own argument. The scheduler from ``lr_scheduler_type``/``warmup_steps`` scales both.
"""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from muonkit.integrations import hf_optimizers

VOCAB, CTX = 64, 16


class Sequences(torch.utils.data.Dataset):
    """x[t+1] = (3 x[t] + 1) mod VOCAB, from random starts."""

    def __init__(self, n: int = 512):
        x = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
        cols = [x]
        for _ in range(CTX - 1):
            cols.append((3 * cols[-1] + 1) % VOCAB)
        self.data = torch.cat(cols, dim=1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def tiny_llama(hidden_size: int = 64) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama with tied embeddings and grouped-query attention (seed 0)."""
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CTX,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def main() -> None:
    model = tiny_llama()
    steps = 100
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        weight_decay=0.01,
        warmup_steps=10,
        lr_scheduler_type="cosine",
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
    )
    opt, scheduler = hf_optimizers(model, args, num_training_steps=steps, lr=0.02)
    Trainer(model=model, args=args, train_dataset=Sequences(), optimizers=(opt, scheduler)).train()


if __name__ == "__main__":
    main()
