"""Three stages of the step pipeline (``muonkit.optim.pipeline``), one per slot, that tests register to show that
a stage added there runs on every step path and agrees with its reference. Not rules anyone should train with:
each is the simplest non-linear example of its slot.

- precondition ``test_unit_rows``: every row divided by its norm (a row equilibration);
- postscale ``test_row_rms``: every row of the NS output rescaled to the matrix's RMS;
- update ``test_masked_decay``: weight decay only where the update and the weight have the same sign.
"""

from __future__ import annotations

import torch

from muonkit.optim import pipeline

PRECONDITION, POSTSCALE, UPDATE = "test_unit_rows", "test_row_rms", "test_masked_decay"
NAMES = {"precondition": PRECONDITION, "postscale": POSTSCALE, "update": UPDATE}


def unit_rows(X):
    return X / X.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def unit_rows_reference(X):
    return torch.stack([row / max(float(row.norm()), 1e-30) for row in X])


def row_rms(O):
    rms = O.square().mean(dim=(-2, -1), keepdim=True).sqrt()
    return O * (rms / O.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-30))


def row_rms_reference(O):
    rms = float(O.square().mean().sqrt())
    return torch.stack([row * rms / max(float(row.square().mean().sqrt()), 1e-30) for row in O])


def masked_decay(params, updates, lr, weight_decay):
    for p, u in zip(params, updates):
        u = u.to(p.dtype)
        p.sub_(torch.where(p * u > 0, lr * weight_decay * p, torch.zeros_like(p)) + u)


def masked_decay_reference(p, update, lr, weight_decay):
    flat, u = p.view(-1), update.to(p.dtype).reshape(-1)
    for i in range(flat.numel()):
        decay = lr * weight_decay * float(flat[i]) if float(flat[i]) * float(u[i]) > 0 else 0.0
        flat[i] -= decay + float(u[i])


def register() -> dict[str, str]:
    """Register the three (once per process); returns slot -> name, the options that select them."""
    stages = (
        pipeline.Stage("precondition", PRECONDITION, unit_rows, unit_rows_reference, "a test"),
        pipeline.Stage("postscale", POSTSCALE, row_rms, row_rms_reference, "a test"),
        pipeline.Stage("update", UPDATE, masked_decay, masked_decay_reference, "a test"),
    )
    for stage in stages:
        if stage.name not in pipeline.stage_names(stage.slot):
            pipeline.register(stage)
    return dict(NAMES)


def references() -> dict[str, object]:
    """The registered stages' references, as ``reference.muon_reference_step`` takes them."""
    return {slot: pipeline.get_stage(slot, name).reference for slot, name in register().items()}
