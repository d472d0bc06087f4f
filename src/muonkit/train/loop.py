"""Train the same model, on the same batches from the same seed, with several optimizers.

Each optimizer's run is checkpointed at every evaluation (model, optimizer, data position and the
history so far), so an interrupted comparison keeps what it gathered and ``resume`` continues it on
exactly the trajectory an uninterrupted run would have taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..optim import Muon
from .optimizers import make_optimizer, resolve_lrs
from .recipe import Recipe, Schedule
from .tasks import Task

__all__ = [
    "RunResult",
    "run_comparison",
    "run_key",
    "steps_to_reach",
    "train_one",
]


@dataclass
class RunResult:
    """History of one optimizer's run. Wall-clock counts training steps, not evaluation."""

    optimizer: str
    lr: float
    steps_planned: int
    eval_steps: list[int] = field(default_factory=list)
    eval_wall: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    train_loss: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    optimizer_seconds: float = 0.0
    items: int = 0
    done: bool = False
    # Muon only, at each evaluation after the first: the NS output's diagnostics on that step (``Muon.stats``),
    # largest over the groups (smallest for sigma_min): orth_error, sigma_min, sigma_max, epsilon, chi; and
    # l_effective (``effective_l``)
    ns_stats: dict[str, list[float]] = field(default_factory=dict)

    @property
    def val_loss(self) -> list[float]:
        return self.metrics.get("val_loss", [])

    @property
    def items_per_s(self) -> float:
        return self.items / self.train_seconds if self.train_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "items_per_s": self.items_per_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def run_key(name: str, seed: int, seeds: int = 1) -> str:
    """How a run is named in a comparison's results (and its checkpoint file): the optimizer's name, with
    ``/seed<k>`` when the comparison runs several seeds."""
    return name if seeds == 1 else f"{name}/seed{seed}"


def steps_to_reach(result: RunResult, target: float) -> tuple[int | None, float | None]:
    """First evaluated step (and its training wall-clock) with validation loss <= ``target``."""
    for step, loss, wall in zip(result.eval_steps, result.val_loss, result.eval_wall):
        if loss <= target:
            return step, wall
    return None, None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_one(
    task: Task,
    name: str,
    *,
    steps: int,
    eval_every: int,
    seed: int = 0,
    lrs: dict[str, float] | None = None,
    checkpoint: Path | None = None,
    resume: dict[str, Any] | None = None,
    on_step: Callable[[RunResult], None] | None = None,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    recipe: Recipe | None = None,
) -> RunResult:
    """Train a fresh model (initialised from ``seed``) with optimizer ``name``.

    ``recipe``: the learning-rate schedule, weight decay and gradient clipping (``train.recipe``); ``None``: the
    learning rates held constant, no weight decay, no clipping (what the theory experiments need).
    ``optimizer_factory(model)`` replaces the named optimizer (``name`` then only labels the run; the recipe's
    schedule and clipping still apply).
    ``resume`` is a checkpoint dict written by an earlier call; training continues from it. With
    ``checkpoint`` set, state is saved there at every evaluation. ``KeyboardInterrupt`` propagates
    after the last checkpoint (if any) is on disk: nothing gathered before it is lost.
    """
    torch.manual_seed(seed)
    model = task.build_model()
    lrs = resolve_lrs(task.lr_key, lrs)
    if optimizer_factory is not None:
        opt = optimizer_factory(model)
    else:
        wd = recipe.decay_for(name) if recipe is not None else 0.0
        opt = make_optimizer(name, model, lrs, split_qkv=task.name == "lm", weight_decay=wd)
    schedule = Schedule(opt, recipe, steps, name) if recipe is not None else None  # peaks read before any loading
    gen = torch.Generator().manual_seed(seed + 1)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["data_generator"])
        result = RunResult.from_dict(resume["result"])
        result.steps_planned = steps
    else:
        result = RunResult(name, lrs[name], steps)

    def evaluate_and_save(step: int) -> None:
        result.eval_steps.append(step)
        result.eval_wall.append(result.train_seconds)
        for key, value in task.evaluate(model).items():
            result.metrics.setdefault(key, []).append(value)
        if checkpoint is not None:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "data_generator": gen.get_state(),
                "result": result.to_dict(),
            }
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(checkpoint)  # atomic: a Ctrl-C never leaves a half-written checkpoint

    start = result.eval_steps[-1] if result.eval_steps else 0
    if not result.eval_steps:
        evaluate_and_save(0)
    for step in range(start + 1, steps + 1):
        x, y = task.train_batch(gen)
        _sync(task.device)
        t0 = time.perf_counter()
        loss = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe is not None and recipe.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        if schedule is not None:
            schedule.set(step)
        _sync(task.device)
        t1 = time.perf_counter()
        evaluating = step % eval_every == 0 or step == steps
        probe = opt if evaluating and isinstance(opt, Muon) else None
        if probe is not None:
            probe.diagnostics = True  # this step only: the statistics cost a few power iterations per batch
        opt.step()
        _sync(task.device)
        t2 = time.perf_counter()
        if probe is not None:
            _record_ns_stats(result, probe)
            probe.diagnostics = False
            result.ns_stats.setdefault("l_effective", []).append(effective_l(probe))
        result.train_seconds += t2 - t0
        result.optimizer_seconds += t2 - t1
        result.items += task.items_per_batch(x)
        result.train_loss.append(loss.item())
        if evaluating:
            evaluate_and_save(step)
        if on_step is not None:
            on_step(result)
    result.done = True
    return result


def _record_ns_stats(result: RunResult, opt: Muon) -> None:
    """Append the step's NS statistics (``Muon.stats``, one host sync), reduced over the Muon groups."""
    stats = opt.stats()
    for key in ("orth_error", "sigma_min", "sigma_max", "epsilon", "chi"):
        values = [v for k, v in stats.items() if k.endswith("/" + key)]
        if values:
            result.ns_stats.setdefault(key, []).append(min(values) if key == "sigma_min" else max(values))


def orthogonalized_matrices(opt: Muon, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The matrices ``opt``'s last step orthogonalized, rebuilt in ``dtype`` from each Muon parameter's gradient
    and momentum buffer (the Nesterov blend ``g.lerp(buf, momentum)``, or the buffer) and viewed as the step views
    them (conv kernels flattened, split into parts). Parameters without a gradient or a buffer are left out."""
    from ..optim.parts import matrix_parts

    for group in opt.param_groups:
        if group.get("algorithm") != "muon":
            continue
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is None or p.grad is None:
                continue
            buf = buf.to(dtype)
            u = p.grad.to(dtype).lerp(buf, group["momentum"]) if group["nesterov"] else buf
            yield from matrix_parts(u, group["matrix_view"], group["split"])


def effective_l(opt: Muon, energy: float = 0.99) -> float:
    """The smallest singular value that matters in this step's Muon updates, as NS sees it: per matrix, the
    update ``u`` that was orthogonalized (Nesterov blend of gradient and momentum), its singular values divided
    by ``||u||_F`` (NS's normalisation), and the smallest of them still needed to hold ``energy`` of
    ``||u||_F^2``; the minimum over the matrices. Kim & Oh's ``l`` for the part of the spectrum that carries the
    update (the exact smallest one is ~0: LayerNorm'ed inputs leave every gradient a null direction). One batched
    float32 SVD per matrix shape, outside the timed step."""
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for M in orthogonalized_matrices(opt, torch.float32):
        by_shape.setdefault(tuple(M.shape), []).append(M)
    found = 1.0
    for mats in by_shape.values():
        x = torch.linalg.svdvals(torch.stack(mats)).double()  # (b, k), each row sorted descending
        x = x / x.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-300)
        kept = (x.square().cumsum(-1) < energy).sum(-1).clamp_max(x.shape[-1] - 1)  # index of the last one needed
        found = min(found, float(x.gather(-1, kept.unsqueeze(-1)).min()))
    return found


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint; ``OSError`` naming the file where it cannot be read (truncated, not a checkpoint)."""
    try:
        state = torch.load(path, weights_only=False)
        state["result"]["eval_steps"]
    except Exception as err:  # torch.load raises several kinds for a damaged file
        raise OSError(
            f"{path} cannot be read as a checkpoint ({type(err).__name__}); remove it to start that run again"
        ) from None
    return state


def run_comparison(
    task: Task,
    optimizers: list[str],
    *,
    steps: int,
    eval_every: int,
    seed: int = 0,
    lrs: dict[str, float] | None = None,
    out_dir: Path | None = None,
    previous: dict[str, RunResult] | None = None,
    progress: bool = True,
    on_step: Callable[[RunResult], None] | None = None,
    recipe: Recipe | None = None,
    seeds: int = 1,
) -> tuple[dict[str, RunResult], bool]:
    """Run every optimizer in turn, each with seeds ``seed`` to ``seed + seeds - 1`` (model initialisation and
    batch order), keyed by ``run_key``; returns (results, interrupted).

    With ``out_dir``, each run checkpoints to ``out_dir/checkpoint-<name>.pt`` and a run found there
    unfinished is resumed. ``previous`` holds finished runs (from ``results.json``) that are kept as is.
    On Ctrl-C the runs gathered so far are returned with ``interrupted=True``.
    """
    from tqdm.auto import tqdm

    results: dict[str, RunResult] = dict(previous or {})
    runs = [(name, s) for name in optimizers for s in range(seed, seed + seeds)]
    for name, run_seed in runs:
        key = run_key(name, run_seed, seeds)
        if key in results and results[key].done:
            continue
        ckpt = out_dir / f"checkpoint-{key.replace('/', '-')}.pt" if out_dir is not None else None
        resume = _load_checkpoint(ckpt) if ckpt is not None and ckpt.exists() else None
        done_before = resume["result"]["eval_steps"][-1] if resume else 0
        bar = tqdm(total=steps, initial=done_before, desc=f"{key:<8}", disable=not progress or None, leave=True)

        def tick(r: RunResult, bar: Any = bar) -> None:
            bar.update(1)
            if len(r.train_loss) % 10 == 0:
                bar.set_postfix(loss=f"{r.train_loss[-1]:.3f}", val=f"{r.val_loss[-1]:.3f}")
            if on_step is not None:
                on_step(r)

        try:
            results[key] = train_one(
                task,
                name,
                steps=steps,
                eval_every=eval_every,
                seed=run_seed,
                lrs=lrs,
                checkpoint=ckpt,
                resume=resume,
                on_step=tick,
                recipe=recipe,
            )
        except KeyboardInterrupt:
            bar.close()
            if ckpt is not None and ckpt.exists():
                results[key] = RunResult.from_dict(torch.load(ckpt, weights_only=False)["result"])
            return results, True
        bar.close()
    return results, False
