"""The optimizers the demo compares, by name, with their tuned learning rates: ``make_optimizer(name, model, lrs)``.

``OPTIMIZERS`` lists them: Muon (``muonkit.Muon`` on ``param_groups``) and its variants (each one stage or option of
the step: see docs/demo.md), torch.optim.Muon with AdamW beside it, AdamW and SGD. ``DEFAULT_LR`` holds each one's
peak learning rate per task and size, the best of a sweep (the comment above it says which).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..optim import Muon, param_groups

__all__ = ["DEFAULT_LR", "OPTIMIZERS", "Combined", "hidden_matrices", "make_optimizer", "resolve_lrs"]

OPTIMIZERS = ("muon", "adamw", "sgd", "muon_svd", "torch_muon", "muon_cwd", "muon_heads", "muon_heads_o", "normuon",
              "muon_aol", "muon_eq", "muon_cans", "muon_mw")  # fmt: skip

# Peak learning rates, each the best of a sweep with benchmarks/lr_sweep.py (JSON with the hardware in
# benchmarks/results/): same seed and batches as the demo, final validation loss after the given steps.
#   lm-small  (2-core CPU, torch 2.13; 300 steps, batch 16 x 128 bytes; under the demo's recipe: warmup, cosine,
#             weight decay, clipping; lr_sweep_lm_small_recipe_cpu.json): adamw in {2.5e-4, 5e-4, 1e-3, 2e-3,
#             4e-3} -> 2e-3 (2.209; 4e-3: 2.212); muon in {0.005, 0.01, 0.02, 0.04, 0.08} with its AdamW part at
#             2e-3 -> 0.04 (1.634; 0.02: 1.654). sgd (Nesterov, momentum 0.9; swept at constant lr without weight
#             decay or clipping) in {0.003 .. 1.0} -> 0.01.
#   lm-medium (H200, torch 2.11; 500 steps, batch 32 x 256; under the recipe, on 4.5 MB of standard-library source
#             (a glob over the interpreter's lib, lr_sweep_lm_medium_recipe_h200.json): adamw in {5e-4, 1e-3, 2e-3,
#             4e-3, 8e-3} -> 2e-3 (1.282; 1e-3: 1.405); muon in {0.01, 0.02, 0.04, 0.08} with its AdamW part at
#             2e-3 -> 0.02 (0.809; 0.04: 0.813).
#   lm-large  (H200, the same; 300 steps, batch 32 x 512; lr_sweep_lm_large_recipe_h200.json and
#             ..._adamw_low_h200.json): adamw in {3e-5, 6e-5, 1.25e-4, 2.5e-4, 5e-4 .. 4e-3} -> 2.5e-4 (1.810;
#             1.25e-4: 1.866, 5e-4: 1.970); muon in {0.01, 0.02, 0.04, 0.08} with its AdamW part at 2.5e-4 ->
#             0.04 (0.705; 0.02: 0.745).
#   lm-tiny   (2-core CPU; 40 steps, the quick demo's; batch 16 x 64; under the recipe, 3 initialisations per lr;
#             lr_sweep_lm_tiny_recipe_cpu.json): adamw in {5e-4 .. 1.6e-2} -> 4e-3 (2.778; 8e-3: 2.808); muon in
#             {0.01 .. 0.16} with its AdamW part at 4e-3 -> 0.04 (2.560; 0.02: 2.567, 0.08: 2.576).
#   digits    (2-core CPU; 300 steps, batch 64; under the recipe, 3 initialisations per lr, mean validation loss;
#             lr_sweep_digits_recipe_cpu_seeds.json): adamw in {0.008, 0.016, 0.032, 0.064, 0.128} -> 0.016 (0.0213;
#             0.008: 0.0243, 0.032: 0.0248); muon in {0.0025 .. 0.08} with its AdamW part at 0.016 -> 0.005 (0.0390;
#             0.02: 0.0395, 0.0025: 0.0951): single-seed sweeps had put each best on a different grid point. sgd
#             (constant lr, one seed) in {0.03 .. 1.0} -> 0.1.
# muon_svd, torch_muon, muon_cwd, muon_heads, muon_heads_o, normuon, muon_aol, muon_eq, muon_cans and muon_mw use
# Muon's lr (the same update norm: exact polar factor; torch.optim.Muon's NS with the same shape scale; Muon with
# cautious decay; Muon per attention head, for Q/K/V and also the output projection; NorMuon, which rescales its
# normalised update to the NS output's norm; AOL pre-conditioning with 4 NS steps; MuonEq's row normalisation; CANS's
# Schatten-4 normalisation; Muon whose momentum warms up, ``recipe.momentum_warmup_for``); sgd outside lm-small and
# digits is not swept and uses lm-small's value.
_MUONS = ("muon", "muon_svd", "torch_muon", "muon_cwd", "muon_heads", "muon_heads_o", "normuon", "muon_aol", "muon_eq",
          "muon_cans", "muon_mw")  # fmt: skip
_SMALL = {**dict.fromkeys(_MUONS, 0.04), "adamw": 2e-3, "sgd": 0.01}
_GPU = {**dict.fromkeys(_MUONS, 0.02), "sgd": 0.01}
DEFAULT_LR: dict[str, dict[str, float]] = {
    "lm-tiny": {**_SMALL, "adamw": 4e-3},
    "lm-small": _SMALL,
    "lm-medium": {**_GPU, "adamw": 2e-3},
    "lm-large": {**_GPU, **dict.fromkeys(_MUONS, 0.04), "adamw": 2.5e-4},
    "digits": {**dict.fromkeys(_MUONS, 0.005), "adamw": 0.016, "sgd": 0.1},
}


def resolve_lrs(key: str, overrides: dict[str, float] | None = None) -> dict[str, float]:
    """Default learning rates for ``key`` (e.g. ``"lm-small"``; unknown LM sizes use lm-small's) with
    ``overrides`` applied. Inside Muon runs the embeddings, head and 1-D parameters take the ``"adamw"`` lr.
    """
    unknown = set(overrides or {}) - set(OPTIMIZERS)
    if unknown:
        raise ValueError(f"learning rate given for unknown optimizer(s) {sorted(unknown)}")
    return {**DEFAULT_LR.get(key, _SMALL), **(overrides or {})}


def make_optimizer(
    name: str, model: nn.Module, lrs: dict[str, float], split_qkv: bool = False, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Optimizer ``name`` (one of ``OPTIMIZERS``) for ``model`` with learning rates ``lrs`` (see ``resolve_lrs``) and
    decoupled ``weight_decay``: for Muon, its variants and torch.optim.Muon on every parameter (their AdamW part
    included), for AdamW on the parameters with two or more dimensions only, for SGD on every parameter."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    lr = lrs[name]
    if name in _MUONS and name != "torch_muon":
        groups = param_groups(model, split=_demo_split(name, model) if split_qkv else None)
        method = "svd" if name == "muon_svd" else "auto"
        update = "cautious" if name == "muon_cwd" else "decoupled"  # muon_cwd: cautious decay on the Muon matrices
        postscale = "normuon" if name == "normuon" else "none"  # normuon: rows normalised by their second moment
        # muon_aol (one NS step fewer), muon_eq, muon_cans: the precondition stages of Turbo-Muon, MuonEq and CANS
        precondition = {"muon_aol": "aol", "muon_eq": "row_norm", "muon_cans": "schatten4"}.get(name, "none")
        return Muon(groups, lr=lr, method=method, update=update, postscale=postscale, weight_decay=weight_decay,
                    precondition=precondition, ns_steps=4 if name == "muon_aol" else 5, adamw_lr=lrs["adamw"],
                    adamw_betas=(0.9, 0.95))  # fmt: skip
    if name == "torch_muon":
        return _torch_muon(model, lr, lrs["adamw"], weight_decay)
    if name == "adamw":
        params: Any = list(model.parameters())
        if weight_decay:  # gains and biases undecayed
            params = [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ]
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _demo_split(name: str, model: nn.Module) -> dict[str, Any]:
    """The splits of the demo GPT's attention for optimizer ``name``: the fused QKV in q, k and v; ``muon_heads``:
    in q, k and v of every head (``3 x heads`` row blocks); ``muon_heads_o``: that, and the output projection in
    the column block of every head (its input features are the heads' outputs)."""
    if name not in ("muon_heads", "muon_heads_o"):
        return {"*.qkv.weight": 3}
    heads = {n for m in model.modules() if isinstance(n := getattr(m, "n_head", None), int)}
    if len(heads) != 1:
        raise ValueError(f"{name} needs a model whose attention layers share one head count (the demo's GPT)")
    h = heads.pop()
    split: dict[str, Any] = {"*.qkv.weight": 3 * h}
    if name == "muon_heads_o":
        split["*.attn.proj.weight"] = {"cols": h}
    return split


class Combined(torch.optim.Optimizer):
    """Two torch optimizers stepped as one (torch.optim.Muon for the hidden matrices, AdamW for the rest): one
    ``step``, ``zero_grad`` and ``state_dict`` for the training loop. Its ``param_groups`` are theirs, in order."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.defaults = {}
        self.state = defaultdict(dict)  # the parts keep their own state; torch.optim's helpers expect the mapping

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"combined": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("combined") if isinstance(state_dict, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise ValueError("not a state dict of this combination of optimizers")
        for o, sd in zip(self.optimizers, saved):
            o.load_state_dict(sd)


def hidden_matrices(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(matrices, rest)``: the 2-D parameters ``param_groups`` gives Muon, and every other parameter (what another
    Muon implementation, which takes plain matrices only, and the AdamW beside it get)."""
    matrices: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    for group in param_groups(model):
        for p in group["params"]:
            (matrices if group.get("algorithm", "muon") == "muon" and p.ndim == 2 else rest).append(p)
    return matrices, rest


def _torch_muon(model: nn.Module, lr: float, adamw_lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """torch.optim.Muon (its defaults: Nesterov, momentum 0.95, NS5 in bf16, its "original" shape scale, no QKV
    split) on the 2-D matrices ``param_groups`` gives Muon, AdamW (betas 0.9, 0.95) on everything else, both with
    ``weight_decay`` as muonkit's Muon runs take it. Conv kernels, which torch.optim.Muon does not take, go to
    AdamW."""
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"torch_muon needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
    matrices, rest = hidden_matrices(model)
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay)
    adamw = torch.optim.AdamW(rest, lr=adamw_lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    return Combined(muon, adamw)
