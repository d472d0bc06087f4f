"""``muonkit.Muon``: one ``torch.optim.Optimizer`` for a whole model.

Hidden weight matrices take Muon; parameter groups marked ``algorithm="adamw"`` (embeddings, the
output head, 1-D parameters; see ``muonkit.param_groups``) take AdamW inside the same ``step()``,
so a model has one optimizer, one ``state_dict`` and one LR scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import accel as _accel
from ..accel import fused, kernels
from ..coefficients import CoefficientSpec
from .adamw import adamw_group
from .functional import _muon_steps
from .loading import (
    _check_loadable,
    check_group,
    muon_state,
    pickled_settings,
    restore_after_load,
    restore_settings,
    whole_buffers,
)
from .nonfinite import NONFINITE_POLICIES, NonFiniteGradientError, device_flag, nonfinite_skip, settle
from .options import step_options
from .parts import SplitSpec
from .pipeline import get_stage
from .probe import recompute_stats
from .remembered import _Remembered
from .repeat import Repeat, repeatable, step_again
from .sharded import sharded_muon_step, zero_muon_step
from .shards import is_sharded
from .stages import AdjustLR, Executor, summarise_stats
from .tuning import pretune

__all__ = ["NONFINITE_POLICIES", "Muon", "NonFiniteGradientError"]

ALGORITHMS = ("muon", "adamw")


class Muon(Optimizer):
    """Muon for hidden matrices, AdamW for the groups that ask for it, in one optimizer.

    Args:
        params: parameters or parameter groups, typically ``muonkit.param_groups(model)``. A group
            may set ``algorithm="adamw"`` (and its own ``lr``, ``betas``, ``eps``, ``weight_decay``).
        lr: Muon learning rate (default 0.02, Jordan 2024).
        momentum: Muon momentum ``mu`` (default 0.95); buffer ``buf.lerp_(g, 1 - mu)``.
        nesterov: use the Nesterov blend ``g.lerp(buf, mu)`` (default True).
        weight_decay: decoupled weight decay, ``p *= 1 - lr * weight_decay``.
        ns_steps: Newton-Schulz steps (``None``: the preset's default).
        coefficients: preset name or rows (see ``muonkit.coefficients``).
        adjust_lr: ``"original"`` = ``lr * sqrt(max(1, rows/cols))``, ``"match_rms_adamw"`` =
            ``lr * 0.2 * sqrt(max(rows, cols))``, a number ``f`` = ``lr * f * sqrt(max(rows, cols))`` (your
            own RMS-matching factor), ``None``, or a callable ``f(lr, (rows, cols))``.
        eps: added to the Frobenius norm before normalising (Muon groups).
        ns_dtype: NS precision; ``None`` = bfloat16 on CUDA, float32 elsewhere.
        method: ``"auto"`` (default: Gram NS on CUDA for NS batches of matrices at least twice as wide as tall and large
            enough, plain NS otherwise; ``newton_schulz.uses_gram``), ``"newton_schulz"``, ``"gram"`` (Gram NS for every
            rectangular matrix: fewer FLOPs) or ``"svd"`` (exact polar factor, for comparisons).
        restarts: where Gram NS runs (``method="gram"``, or ``"auto"``): the steps (1 to the schedule's length - 1)
            before which X is re-formed and its Gram matrix recomputed; ``None`` (default):
            ``newton_schulz.gram_restarts`` of the step count ((3,) for 5 steps). ``(2, 4)`` is the most accurate
            placement measured for 5 steps, at two restarts' cost (see ``orthogonalize``).
        matrix_view: how a parameter with more than 2 dims becomes matrices: ``"flatten"`` (conv
            kernels, ``(out, in*kh*kw)``) or ``"batch"`` (leading dims index independent matrices).
        split: ``None``, ``k`` (cut the rows into k equal parts) or a list of row counts, or
            ``{"rows": ..., "cols": ...}`` to cut columns too; each part is orthogonalized separately (fused QKV:
            ``3``; per attention head: ``heads`` rows of Q/K/V, ``{"cols": heads}`` of the output projection;
            ``muonkit.optim.parts``). Usually set per group. Column parts take the torch path, not the fused step.
        momentum_dtype: dtype of the momentum buffer (default float32; ``None``: the parameter's).
        max_batch: at most this many same-shape matrices per batched NS call (``None``: on the fused CUDA step,
            half the step's matrix entries at most, ``plans.batch_sizes``; on the torch path no cap).
        precondition, postscale, update: the stages of the step pipeline's slots, by name
            (``muonkit.optim.pipeline``): a transformation of each batch of matrices before NS and of NS's
            output after it (``"none"`` by default), and the weight update (``"decoupled"`` weight decay). A
            variant of Muon is a stage registered there; groups may choose their own.
        nonfinite: what a NaN/Inf gradient does: ``"raise"`` (default; ``NonFiniteGradientError``
            naming the parameters, nothing updated), ``"skip"`` (skip the whole step, count it in
            ``nonfinite_skips``), ``"ignore"`` (no check; garbage in, garbage out). On one CUDA device a repeated
            step checks on the GPU without a host sync: a bad step changes nothing there and then, and the error
            comes from the next ``step()`` (before it changes anything); ``muonkit.optim.nonfinite`` says how.
        adamw_lr: learning rate of ``algorithm="adamw"`` groups.
        adamw_betas: their ``(beta1, beta2)``.
        adamw_eps: their epsilon.
        adamw_weight_decay: their decoupled weight decay (``None``: the same as ``weight_decay``).
        diagnostics: keep per-step statistics of the Muon groups as device tensors (no host sync):
            ``opt.stats()`` turns them into floats (one sync) - orthogonality error of the NS output, update
            RMS, and each group's effective learning rates. Every step then runs its NS batches eagerly; to
            look only now and then, leave it off and call ``opt.recompute_stats()`` after the steps to look at.
        executor: who runs the batched NS jobs. ``None``: all of them here. With replicated parameters
            under torch.distributed (DDP), ``muonkit.distributed.ReplicatedExecutor()`` gives each rank a
            FLOP-balanced share and exchanges the results; the non-finite check then agrees across ranks.
            Sharded parameters (FSDP2 ``fully_shard``, DTensor ``Shard(0)``) need no executor: each whole
            matrix is assembled on one owner rank, orthogonalized there and its rows sent back (two
            all-to-alls per same-shape bucket; see ``muonkit.distributed``); the state is sharded like the
            parameters, so ``torch.distributed.checkpoint`` saves and reshards it.
        comm_dtype: dtype in which sharded parameters' updates travel to their owners (``None``: exact;
            ``torch.bfloat16`` halves those bytes). Results come back in the NS dtype either way.
        accel: CUDA acceleration (``muonkit.accel``: Triton kernels, fused element-wise passes, CUDA graphs, and
            timing the kernel's tile sizes for this optimizer's shapes here, at construction). ``None`` (default):
            on unless the environment variable ``MUONKIT_ACCEL`` is 0 / false / off, read now. ``False``: plain
            torch, nothing tuned or captured. No effect on CPU parameters. The tuning here took 30.6 s in a fresh
            process for a 12 x 768 GPT on an H200 (Triton compiling), 0.6-2.0 s with the kernels compiled.
    """

    _stats: dict[int, dict[str, list[Tensor]]]
    _repeat: Repeat | None
    _nonfinite_pending: Any
    _finite_host: tuple | None
    _nonfinite_error: NonFiniteGradientError | None

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int | None = 5,
        coefficients: CoefficientSpec = "jordan",
        adjust_lr: AdjustLR = "original",
        eps: float = 1e-7,
        *,
        ns_dtype: torch.dtype | None = None,
        method: str = "auto",
        restarts: Sequence[int] | None = None,
        matrix_view: str = "flatten",
        split: SplitSpec = None,
        momentum_dtype: torch.dtype | None = torch.float32,
        max_batch: int | None = None,
        precondition: str = "none",
        postscale: str = "none",
        update: str = "decoupled",
        nonfinite: str = "raise",
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float | None = None,
        executor: Executor | None = None,
        comm_dtype: torch.dtype | None = None,
        diagnostics: bool = False,
        accel: bool | None = None,
    ) -> None:
        if accel is not None and not isinstance(accel, bool):
            raise TypeError(f"accel must be True, False or None (read MUONKIT_ACCEL), got {accel!r}")
        self.accel = _accel.from_env() if accel is None else accel
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._nonfinite_skips = 0
        self.executor = executor
        if comm_dtype is not None and not (isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point):
            raise ValueError(f"comm_dtype must be None or a floating torch.dtype, got {comm_dtype!r}")
        self.comm_dtype = comm_dtype
        self.diagnostics = diagnostics
        self._reset_runtime()
        self._adamw_defaults = {
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": weight_decay if adamw_weight_decay is None else adamw_weight_decay,
        }
        defaults = {
            "algorithm": "muon",
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_steps": ns_steps,
            "coefficients": coefficients,
            "adjust_lr": adjust_lr,
            "eps": eps,
            "ns_dtype": ns_dtype,
            "method": method,
            "restarts": list(restarts) if isinstance(restarts, tuple | list) else restarts,  # checked per group
            "matrix_view": matrix_view,
            "split": split,
            "momentum_dtype": momentum_dtype,
            "max_batch": max_batch,
            "precondition": precondition,
            "postscale": postscale,
            "update": update,
        }
        super().__init__(params, defaults)
        on_cuda = any(p.is_cuda for g in self.param_groups if g["algorithm"] == "muon" for p in g["params"])
        on_cuda = on_cuda and self.accel
        if on_cuda and kernels.prepare():  # register the Triton op now, so a torch.compile'd first step can use it
            pretune(self)
        if on_cuda:
            fused.prepare()  # likewise the fused element-wise kernels' custom ops

    # ------------------------------------------------------------------ groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        algorithm = param_group.setdefault("algorithm", "muon")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"param group algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if algorithm == "adamw":
            for key, value in self._adamw_defaults.items():
                param_group.setdefault(key, value)
            super().add_param_group(param_group)
            for key in set(self.defaults) - {"algorithm", *self._adamw_defaults}:
                param_group.pop(key, None)  # Muon-only options have no meaning for AdamW groups
        else:
            super().add_param_group(param_group)
        check_group(self, param_group, len(self.param_groups) - 1)
        self._repeat = None

    @staticmethod
    def _param_name(group: dict[str, Any], gi: int, i: int) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return repr(names[i])
        return f"param_groups[{gi}]['params'][{i}]"

    # ------------------------------------------------------------------ step

    def _gather(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        gathered = []
        for gi, group in enumerate(self.param_groups):
            params, grads = [], []
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(
                        f"parameter {self._param_name(group, gi, i)} has a sparse gradient, which Muon and "
                        "its AdamW groups do not support; use nn.Embedding(sparse=False)"
                    )
                if g.is_complex():
                    raise ValueError(f"parameter {self._param_name(group, gi, i)} has a complex gradient")
                params.append(p)
                grads.append(g)
            gathered.append((group, params, grads))
        return gathered

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimizer step. Returns the closure's loss when a closure is given. Step hooks and the profiler's
        range work as for any ``torch.optim`` optimizer (torch.optim wraps this method)."""
        if getattr(self, "accel", True):  # absent on an optimizer pickled before the option existed
            return self._run_step(closure)
        with _accel.disabled():
            return self._run_step(closure)

    def _reset_runtime(self) -> None:
        """What steps build as they run, which no copy carries (``__setstate__`` makes it afresh too)."""
        self._sharded_bytes = [0]
        self._stats = {}
        self._repeat = None
        self._nonfinite_pending = None  # a step checked on the device, not yet read (``nonfinite.defer``)
        self._finite_host = None  # where that step's flag goes: (device, pinned tensor, its numpy view, event)
        self._nonfinite_error = None  # found there, for the next step() to raise

    @property
    def nonfinite_skips(self) -> int:
        """Steps skipped for a non-finite gradient (policy ``"skip"``). Reading it waits for a step checked on
        the GPU, if one is still in flight."""
        settle(self)
        return self._nonfinite_skips

    @nonfinite_skips.setter
    def nonfinite_skips(self, value: int) -> None:
        self._nonfinite_skips = int(value)

    @torch.no_grad()
    def _run_step(self, closure: Callable[[], Any] | None = None) -> Any:
        settle(self)  # the previous step, if it was checked on the device
        error = self._nonfinite_error
        if error is not None:
            self._nonfinite_error = None
            raise error
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        compiling = torch.compiler.is_compiling()  # traced: no repeat (and no attribute assignment)
        if not compiling:
            repeat_ = self._repeat
            if repeat_ is not None and self._step_again(repeat_):
                return loss
            self._repeat = None
        gathered = self._gather()
        flag = None
        if self.nonfinite != "ignore":
            flag = device_flag(self, [g for _, _, gs in gathered for g in gs])
            if nonfinite_skip(self, gathered, flag):
                return loss

        self._stats.clear()  # mutate, not rebind: torch.compile cannot trace attribute assignment here
        pending = []  # Muon groups run together at the end: same-shape matrices of different groups share NS batches
        # Muon groups first: their state is checked there, so a bad buffer raises before any parameter changes
        for gi, (group, params, grads) in enumerate(gathered):
            if group["algorithm"] == "muon":
                stats = self._stats.setdefault(gi, {}) if self.diagnostics else None
                pending.extend(self._muon_group(group, params, grads, stats))
        for group, params, grads in gathered:
            if group["algorithm"] == "adamw":
                adamw_group(self.state, group, params, grads, flag)
        entry = _muon_steps(pending, flag)  # None under torch.compile
        if entry is not None and not compiling:
            self._repeat = self._repeatable(gathered, pending, entry)
        return loss

    def _repeatable(
        self, gathered: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], pending: list, entry: _Remembered
    ) -> Repeat | None:
        """What lets the next step skip ``_gather`` and ``_muon_group`` (see ``repeat.repeatable``)."""
        return repeatable(self, gathered, pending, entry)

    def _step_again(self, rec: Repeat) -> bool:
        """The step of ``rec`` again with the current gradients, or ``False`` (see ``repeat.step_again``)."""
        return step_again(self, rec)

    def _muon_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], stats: dict | None = None
    ) -> list[tuple[list[Tensor], list[Tensor], list[Tensor], dict[str, Any]]]:
        """Steps the group's sharded parameters (and ZeRO-1 rows) now; returns the ``muon_steps`` call for the rest."""
        rows_only = self._shard_state()
        stateful = get_stage("postscale", group["postscale"]).rows_state
        sharded = [is_sharded(p) for p in params]
        bufs, states = muon_state(self, group, params, rows_only, stateful)
        if any(sharded):
            pick = lambda xs, want: [x for x, s in zip(xs, sharded) if s == want]
            sharded_muon_step(
                pick(params, True),
                pick(grads, True),
                pick(bufs, True),
                **step_options(group),
                comm_dtype=self.comm_dtype,
                stats=stats,
                counter=self._sharded_bytes,
                stage_states=pick(states, True) if stateful else None,
            )
            params, grads, bufs = pick(params, False), pick(grads, False), pick(bufs, False)
            states = pick(states, False) if stateful else states
        if rows_only:
            zero_muon_step(
                params,
                grads,
                bufs,
                executor=self.executor,  # type: ignore[arg-type]
                **step_options(group),
                comm_dtype=self.comm_dtype,
                stats=stats,
                counter=self._sharded_bytes,
                stage_states=states if stateful else None,
            )
            return []
        opts = {**step_options(group), "executor": self.executor, "stats": stats}
        if stateful:
            opts["stage_states"] = states
        return [(params, grads, bufs, opts)]

    def _shard_state(self) -> bool:
        return bool(getattr(self.executor, "shard_state", False)) and getattr(self.executor, "world_size", 1) > 1

    def _has_sharded(self) -> bool:
        return any(is_sharded(p) for g in self.param_groups for p in g["params"])

    @property
    def bytes_communicated(self) -> int:
        """Bytes this rank has sent for Muon's exchanges (sharded parameters and the executor, if any)."""
        return self._sharded_bytes[0] + int(getattr(self.executor, "bytes_communicated", 0))

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (needs ``diagnostics=True``); reading them syncs with the device once.

        Keys: ``group{i}/orth_error`` (largest ``||O O^T - I||_F / sqrt(k)`` over the group's NS outputs),
        ``group{i}/sigma_max`` and ``group{i}/sigma_min`` (largest and smallest singular value of those outputs,
        power-iteration estimates), ``group{i}/epsilon`` (``max(sigma_max - 1, 1 - sigma_min)``, the polar error
        that Kim & Oh's Theorem 1 takes) and ``group{i}/chi`` (``1 / (1 - epsilon)``, its constant; infinite
        for a rank-deficient update, whose null directions stay 0),
        ``group{i}/update_rms`` (largest RMS of a scaled update), ``group{i}/lr`` and ``group{i}/lr_max``
        (the group's lr and its largest shape-adjusted lr).
        """
        if not self.diagnostics:
            raise RuntimeError(
                "construct Muon(..., diagnostics=True) to collect statistics, or call recompute_stats() after a step"
            )
        return summarise_stats(self._stats, self.param_groups)

    def recompute_stats(self) -> dict[str, float]:
        """``stats()`` of the last step without ``diagnostics=True``: recomputed now from each Muon parameter's
        gradient and momentum buffer (call it after ``step()``, before the gradients are cleared). The steps keep
        their fast path; the cost (one eager NS pass and the power iterations) falls on this call. See
        ``optim.probe``."""
        return recompute_stats(self)

    # ------------------------------------------------------------------ state

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` keep: torch.optim's three members (defaults, state, groups) and
        Muon's own settings (``loading.PICKLED``). The executor is not kept (it holds a process group): an unpickled
        optimizer has none until one is assigned (``opt.executor = ReplicatedExecutor()``)."""
        settle(self)  # a pending step's skip is counted before it is saved
        return {**super().__getstate__(), "muonkit": pickled_settings(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        kept = state.pop("muonkit", {})  # absent in an optimizer pickled before Muon kept its settings
        super().__setstate__(state)
        restore_settings(self, kept)
        self.executor = None
        self._reset_runtime()

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim``'s. With ``ReplicatedExecutor(shard_state=True)`` the momentum rows of all ranks are
        gathered into whole buffers (a collective: every rank must call it), so any world size can load it."""
        settle(self)  # a step checked on the device: its AdamW step counts are final once read
        sd = whole_buffers(self, super().state_dict())
        sd["muonkit"] = {"nonfinite_skips": self.nonfinite_skips}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim``'s, after checking the whole dict as the constructor checks its arguments: each
        group's algorithm and options, and every state tensor's shape and dtype against its parameter. A dict
        that fails is refused with a ``ValueError`` naming the group or parameter, and nothing is changed."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("muonkit", {})
        _check_loadable(self, state_dict)
        self._repeat = None
        settle(self)  # a pending step's counters are put back (if it was skipped) before they are replaced
        super().load_state_dict(state_dict)
        restore_after_load(self, state_dict)
        self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))
