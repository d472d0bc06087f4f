"""The Muon step as a pipeline of named stages, and the registry a variant adds its stage to.

    momentum -> [precondition] -> orthogonalize -> [postscale] -> update

``momentum`` (``stages.momentum_update``) and ``orthogonalize`` (``stages.ns_jobs``) are the same in every Muon;
the other three are *slots* that a parameter group fills by name (``Muon(..., postscale="name")``, also per
group), so that a variant of the update rule is one ``Stage`` registered here, with its reference beside it, and
every step path (the class, ``muon_step``, the DDP executor, FSDP2/DTensor and ZeRO-1) runs it:

    slot           runs on                                          default
    precondition   each batch of matrices before NS, ``X -> X'``     "none": ``X``
    postscale      each batch of NS outputs, ``O -> O'``            "none": ``O``
    update         the parameters, ``(params, updates, lr, wd)``     "decoupled": ``p <- p (1 - lr wd) - update``

A matrix stage sees matrices as the parameter has them (rows = output features, after conv flattening and the
``split`` into row or column parts: ``parts``), in a batch ``(b, rows, cols)`` of the update's dtype; the lr scale
of ``adjust_lr`` is applied after ``postscale``. Its reference takes one ``(rows, cols)`` float64 matrix. An
update stage's ``fast(params, updates, lr, weight_decay)`` steps lists of tensors in place (``updates`` already
carry their lr); its reference steps one tensor. The defaults have a fused CUDA form, and so have precondition
stages with an ``in_place`` form (the built-in ones): a group with another stage takes the torch path
(``functional``), whose speed the stage's own code decides.

A postscale stage may keep state: one float32 number per row of each matrix (``Stage(..., rows_state=True)``,
e.g. NorMuon's second moment per output neuron). Its ``fast(O, S)`` then also takes ``S``, ``(b, rows, 1)``, and
updates it in place; its ``reference(O, s)`` takes one matrix's ``(rows, 1)``. ``Muon`` keeps it per parameter
under ``state["postscale_state"]`` (shape ``row_state_shape``: saved, loaded and resumed with the rest), and
``muon_step`` takes it as ``stage_states``. The DDP executor keeps it equal on every rank (it travels with the
results); with sharded parameters (FSDP2/DTensor) and ZeRO-1 rows it is whole on every rank, updated by each
matrix's owner and shared by one all-reduce (``sharded._ShardedExchange``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .parts import row_state_shape

__all__ = [
    "SLOTS",
    "Stage",
    "aol",
    "apply_update",
    "cautious_update",
    "get_stage",
    "normuon",
    "register",
    "row_normalise",
    "row_state_shape",
    "stage_names",
    "unregister",
]


@dataclass(frozen=True)
class Stage:
    """One named stage of a slot: ``fast`` (batched, what the step runs), ``reference`` (one matrix or tensor,
    plain, what tests compare ``fast`` with), ``source`` (where the rule comes from), ``fused`` (the fused
    CUDA step computes it too: the defaults, and precondition stages with an ``in_place`` form), ``rows_state``
    (a postscale stage that keeps one number per matrix row; see the module docstring), ``normalises`` (a
    precondition stage whose output has spectral norm at most 1: NS takes it as it is, without dividing by the
    Frobenius norm) and ``in_place`` (a precondition stage's form in the fused step: it transforms the step's NS
    input in place, a batch ``(b, rows, cols)`` of the parameters' matrices with any strides, in the NS dtype
    (bfloat16 on GPUs), already divided by its Frobenius norm; the step divides again after it unless the stage
    ``normalises``)."""

    slot: str
    name: str
    fast: Callable[..., Any]
    reference: Callable[..., Any]
    source: str
    fused: bool = False
    rows_state: bool = False
    normalises: bool = False
    in_place: Callable[[Tensor], None] | None = None


def _same(X: Tensor) -> Tensor:
    return X


def apply_update(params: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """``p <- p (1 - lr wd) - update`` for every parameter (the update already carries its lr)."""
    if weight_decay != 0:
        torch._foreach_mul_(list(params), 1 - lr * weight_decay)
    torch._foreach_sub_(list(params), [u.to(p.dtype) for u, p in zip(updates, params)])


def _decoupled_reference(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    p.mul_(1 - lr * weight_decay)
    p.sub_(update.to(p.dtype))


_DEFAULTS = (
    Stage("precondition", "none", _same, _same, "no pre-conditioning: NS takes the momentum as it is", fused=True),
    Stage("postscale", "none", _same, _same, "no post-scaling: the NS output is the update", fused=True),
    Stage(
        "update",
        "decoupled",
        apply_update,
        _decoupled_reference,
        "decoupled weight decay (Loshchilov & Hutter 2019), as torch.optim.Muon",
        fused=True,
    ),
)


def cautious_update(params: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float) -> None:
    """Cautious weight decay: ``p <- p - lr wd [u p >= 0] p - u``, the decay only on the entries where the update
    ``u`` and the weight have the same sign (or either is 0)."""
    ups = [u.to(p.dtype) for u, p in zip(updates, params)]  # may be the caller's tensors: not changed in place
    if weight_decay != 0:
        kept = [torch.where(u * p >= 0, p, torch.zeros_like(p)) for u, p in zip(ups, params)]
        ups = list(torch._foreach_add(ups, kept, alpha=lr * weight_decay))
    torch._foreach_sub_(list(params), ups)


def _cautious_reference(p: Tensor, update: Tensor, lr: float, weight_decay: float) -> None:
    flat, u = p.view(-1), update.to(p.dtype).reshape(-1)
    for i in range(flat.numel()):
        x, step = float(flat[i]), float(u[i])
        flat[i] = x - (lr * weight_decay * x if step * x >= 0 else 0.0) - step


def aol(X: Tensor) -> Tensor:
    """AOL rescaling (Turbo-Muon): on each matrix as NS sees it (``W``, the wide orientation), ``W <- diag(s) W`` with
    ``s_i = (sum_j |W W^T|_ij)^(-1/2)``, which bounds the spectral norm by 1 (Prach & Lampert's AOL bound) and lifts
    the small singular values more than a Frobenius normalisation does. Float32 Gram matrix; returns float32."""
    tall = X.shape[-2] > X.shape[-1]
    W = (X.mT if tall else X).float()
    s = torch.rsqrt((W @ W.mT).abs().sum(dim=-1).clamp_min(1e-30))
    W = W * s.unsqueeze(-1)
    return W.mT if tall else W


def _aol_reference(X: Tensor) -> Tensor:
    tall = X.shape[0] > X.shape[1]
    W = (X.T if tall else X).double()
    m, n = W.shape
    out = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        total = sum(abs(sum(float(W[i, k]) * float(W[j, k]) for k in range(n))) for j in range(m))
        for k in range(n):
            out[i, k] = float(W[i, k]) / max(total, 1e-30) ** 0.5
    return out.T if tall else out


def schatten4(X: Tensor) -> Tensor:
    """Schatten-4 normalisation (CANS): each matrix divided by ``||X||_S4 = ||W W^T||_F^(1/2)`` (``W`` the wide
    orientation), the ``k = 2`` case of Gelfand's bound ``||X||_2 <= ||(W W^T)^k||_F^(1/(2k))``: the spectral norm
    is then at most 1, and the small singular values start larger than after dividing by ``||X||_F``. Divided by
    the Frobenius norm first, so the Gram product cannot overflow. Float32 Gram matrix; returns float32."""
    tall = X.shape[-2] > X.shape[-1]
    W = (X.mT if tall else X).float()
    W = W / torch.linalg.matrix_norm(W, keepdim=True).clamp_min(1e-30)
    s4 = torch.linalg.matrix_norm(W @ W.mT, keepdim=True).sqrt()  # in [1/sqrt(rank), 1] after the division above
    W = W / s4.clamp_min(1e-30)
    return W.mT if tall else W


def _schatten4_reference(X: Tensor) -> Tensor:
    tall = X.shape[0] > X.shape[1]
    W = (X.T if tall else X).double()
    m, n = W.shape
    total = sum(sum(float(W[i, k]) * float(W[j, k]) for k in range(n)) ** 2 for i in range(m) for j in range(m))
    out = W / max(total, 1e-300) ** 0.25
    return out.T if tall else out


def row_normalise(X: Tensor) -> Tensor:
    """MuonEq's row normalisation (R): every row (output feature) of each matrix to unit Euclidean norm (a zero row
    stays 0). Returns float32."""
    X = X.float()
    return X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-30)


def _row_normalise_in_place(X: Tensor) -> None:
    """``row_normalise`` on the fused step's NS input, in place: float32 norms, one pass that multiplies."""
    norms = torch.linalg.vector_norm(X, dim=-1, keepdim=True, dtype=torch.float32)
    X.mul_(norms.clamp_min_(1e-30).reciprocal_())


def _copied_in_place(fast: Callable[[Tensor], Tensor]) -> Callable[[Tensor], None]:
    """A stage's ``fast`` as an ``in_place`` form: its float32 result copied back into the NS input."""

    def apply(X: Tensor) -> None:
        X.copy_(fast(X))

    return apply


def _row_normalise_reference(X: Tensor) -> Tensor:
    out = X.double().clone()
    for i in range(out.shape[0]):
        norm = float(out[i].square().sum()) ** 0.5
        out[i] = out[i] / max(norm, 1e-30)
    return out


NORMUON_BETA2 = 0.95  # the paper's and its reference code's default
_TINY = 1e-10  # the reference code's guard in both divisions


def normuon(O: Tensor, S: Tensor) -> Tensor:
    """NorMuon's normalisation of NS outputs ``O`` (``(b, rows, cols)``) with the per-row second moments ``S``
    (``(b, rows, 1)``, float32, updated in place): ``S <- S + (1 - beta2) (mean_j O_ij^2 - S)``, each row divided
    by ``sqrt(S_i) + 1e-10``, the result rescaled to ``O``'s Frobenius norm. Returns float32."""
    X = O.float()
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    S.lerp_(X.square().mean(dim=-1, keepdim=True), 1 - NORMUON_BETA2)
    X = X / (S.sqrt() + _TINY)
    return X * (norm / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + _TINY))


def _normuon_reference(O: Tensor, s: Tensor) -> Tensor:
    rows, cols = O.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    before = sum(float(O[i, j]) ** 2 for i in range(rows) for j in range(cols)) ** 0.5
    for i in range(rows):
        mean = sum(float(O[i, j]) ** 2 for j in range(cols)) / cols
        s[i, 0] = float(s[i, 0]) + (1 - NORMUON_BETA2) * (mean - float(s[i, 0]))
        for j in range(cols):
            out[i, j] = float(O[i, j]) / (float(s[i, 0]) ** 0.5 + _TINY)
    after = float(out.square().sum()) ** 0.5
    return out * (before / (after + _TINY))


_BUILT_IN = (
    Stage(
        "update",
        "cautious",
        cautious_update,
        _cautious_reference,
        "Cautious Weight Decay (Chen et al. 2025, arXiv 2510.12402, Algorithm 1): "
        "x <- x - lr (u + wd [u x >= 0] x), entrywise; no new hyper-parameter",
    ),
    Stage(
        "precondition",
        "aol",
        aol,
        _aol_reference,
        "Turbo-Muon (Boissin et al. 2025, arXiv 2512.04632): AOL rescaling W <- diag(s) W, s_i = (sum_j |W W^T|_ij)"
        "^(-1/2), on the wide orientation, in place of the Frobenius normalisation (spectral norm <= 1)",
        fused=True,
        normalises=True,
        in_place=_copied_in_place(aol),
    ),
    Stage(
        "precondition",
        "schatten4",
        schatten4,
        _schatten4_reference,
        "CANS (Grishina, Smirnov & Rakhuba 2025, arXiv 2506.10935), which bounds the spectral norm by Gelfand's "
        "formula: X / ||W W^T||_F^(1/2) (the Schatten-4 norm) in place of X / ||X||_F; one Gram product more",
        fused=True,
        normalises=True,
        in_place=_copied_in_place(schatten4),
    ),
    Stage(
        "precondition",
        "row_norm",
        row_normalise,
        _row_normalise_reference,
        "MuonEq, row form R (arXiv 2603.28254): each row of the momentum matrix to unit norm before NS",
        fused=True,
        in_place=_row_normalise_in_place,
    ),
    Stage(
        "postscale",
        "normuon",
        normuon,
        _normuon_reference,
        "NorMuon (Li et al. 2025, arXiv 2510.05491; its reference code): per output neuron i, v_i <- beta2 v_i + "
        "(1 - beta2) mean_j O_ij^2 (beta2 = 0.95, v from 0), O_ij / (sqrt(v_i) + 1e-10), rescaled to ||O||_F",
        rows_state=True,
    ),
)
SLOTS: dict[str, str] = {s.slot: s.name for s in _DEFAULTS}  # slot -> its default stage's name
_REGISTRY: dict[str, dict[str, Stage]] = {s.slot: {s.name: s} for s in _DEFAULTS}
for _stage in _BUILT_IN:
    _REGISTRY[_stage.slot][_stage.name] = _stage


def register(stage: Stage) -> Stage:
    """Make ``stage`` selectable by name in its slot (a group option of that name). A name already taken in the
    slot is refused: a changed rule gets a new name, so a saved ``state_dict`` never changes meaning."""
    if stage.slot not in SLOTS:
        raise ValueError(f"unknown slot {stage.slot!r}; the slots are {tuple(SLOTS)}")
    if not (isinstance(stage.name, str) and stage.name):
        raise ValueError(f"a stage's name must be a non-empty string, got {stage.name!r}")
    if stage.name in _REGISTRY[stage.slot]:
        raise ValueError(f"{stage.slot} stage {stage.name!r} is already registered")
    if stage.rows_state and stage.slot != "postscale":
        raise ValueError(f"only postscale stages may keep per-row state, not {stage.slot} stage {stage.name!r}")
    if stage.normalises and stage.slot != "precondition":
        raise ValueError(f"only precondition stages may normalise NS's input, not {stage.slot} stage {stage.name!r}")
    if stage.in_place is not None and stage.slot != "precondition":
        raise ValueError(f"only precondition stages have an in_place form, not {stage.slot} stage {stage.name!r}")
    if stage.fused and stage.in_place is None:
        raise ValueError(
            f"{stage.slot} stage {stage.name!r}: the fused step runs an added stage through its in_place form "
            "(precondition stages only); give one, or leave fused=False (the torch path runs it)"
        )
    _REGISTRY[stage.slot][stage.name] = stage
    return stage


def unregister(slot: str, name: str) -> None:
    """Remove a registered stage (the defaults stay)."""
    if name == SLOTS.get(slot):
        raise ValueError(f"the default {slot} stage {name!r} cannot be removed")
    del _REGISTRY[slot][name]


def stage_names(slot: str) -> tuple[str, ...]:
    """The names a group may give the option ``slot``."""
    return tuple(_REGISTRY[slot])


def get_stage(slot: str, name: Any) -> Stage:
    """The stage ``name`` of ``slot``; ``ValueError`` naming the choices where there is none."""
    try:
        return _REGISTRY[slot][name]
    except (KeyError, TypeError):
        raise ValueError(f"{slot} must be one of {stage_names(slot)}, got {name!r}") from None


def fused_stages(opts: dict[str, Any]) -> bool:
    """Whether every stage a group's options select has a fused CUDA form (the defaults; the built-in precondition
    stages, through their ``in_place`` forms)."""
    return all(get_stage(slot, opts.get(slot, default)).fused for slot, default in SLOTS.items())
