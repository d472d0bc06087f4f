"""Train the same model, on the same batches from the same seed, with several optimizers.

Each optimizer's run is checkpointed at every evaluation (model, optimizer, data position and the
history so far), so an interrupted comparison keeps what it gathered and ``resume`` continues it on
exactly the trajectory an uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
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
    "warm_up",
]


@dataclass
class RunResult:
    """History of one optimizer's run. Wall-clock counts building the optimizer and the training steps, not
    evaluation (see ``train_one``)."""

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
    # Muon only, at each evaluation after the first: the NS output's diagnostics on that step (``recompute_stats``),
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


class _Clock:
    """A run's training and optimizer seconds, measured without stalling the device at every step (which would
    expose each step's device work that a real loop overlaps with the next step's host work).

    Training time runs from ``start`` to ``stop`` (the wall-clock, read after a device sync at each pause for an
    evaluation). The optimizer's share: on CUDA, events recorded around each step, read at ``stop`` (the device's
    time from the step's first launch to its last kernel's end); elsewhere the host clock around each step."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.events: list[tuple[Any, Any]] = []
        self.host_step = 0.0
        self.began = 0.0

    def start(self) -> None:
        _sync(self.device)
        self.began = time.perf_counter()

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if not self.cuda:
            t = time.perf_counter()
            yield
            self.host_step += time.perf_counter() - t
            return
        stream = torch.cuda.current_stream(torch.device(self.device))
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        yield
        end.record(stream)
        self.events.append((begin, end))

    def stop(self) -> tuple[float, float]:
        """``(training seconds, optimizer seconds)`` since ``start``."""
        _sync(self.device)
        train = time.perf_counter() - self.began
        steps = sum(b.elapsed_time(e) for b, e in self.events) / 1e3 if self.cuda else self.host_step
        self.events.clear()
        self.host_step = 0.0
        return train, steps


def warm_up(task: Task, seed: int = 0) -> None:
    """One untimed forward, backward and optimizer step of a throwaway model, so that a process's one-off costs
    (the device's libraries and kernels loading on first use; torch importing its compiler, which the first
    torch.optim optimizer built in a process does) land on none of the compared runs, whichever goes first."""
    torch.manual_seed(seed)
    model = task.build_model()
    x, y = task.train_batch(torch.Generator().manual_seed(seed + 1))
    task.loss(model, x, y).backward()
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    _sync(task.device)


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

    Training wall-clock counts building the optimizer (Muon tunes its kernels then) and every step; not the
    evaluations, nor Muon's NS statistics, which are recomputed after the evaluated steps (``recompute_stats``)
    so that every step runs as an ordinary one. Training losses are read from the device at evaluations only.
    """
    torch.manual_seed(seed)
    model = task.build_model()
    lrs = resolve_lrs(task.lr_key, lrs)
    _sync(task.device)
    built = time.perf_counter()
    if optimizer_factory is not None:
        opt = optimizer_factory(model)
    else:
        wd = recipe.decay_for(name) if recipe is not None else 0.0
        opt = make_optimizer(name, model, lrs, split_qkv=task.name == "lm", weight_decay=wd)
    schedule = Schedule(opt, recipe, steps, name) if recipe is not None else None  # peaks read before any loading
    _sync(task.device)
    build_seconds = time.perf_counter() - built
    gen = torch.Generator().manual_seed(seed + 1)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["data_generator"])
        result = RunResult.from_dict(resume["result"])
        result.steps_planned = steps
    else:
        result = RunResult(name, lrs[name], steps)
        result.train_seconds = build_seconds

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
    clock = _Clock(task.device)
    losses: list[torch.Tensor] = []
    clock.start()
    for step in range(start + 1, steps + 1):
        x, y = task.train_batch(gen)
        loss = task.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe is not None and recipe.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        if schedule is not None:
            schedule.set(step)
        with clock.step():
            opt.step()
        losses.append(loss.detach())
        result.items += task.items_per_batch(x)
        if step % eval_every == 0 or step == steps:
            train_s, step_s = clock.stop()
            result.train_seconds += train_s
            result.optimizer_seconds += step_s
            result.train_loss.extend(torch.stack(losses).float().tolist())
            losses.clear()
            if isinstance(opt, Muon):
                _record_ns_stats(result, opt)
                result.ns_stats.setdefault("l_effective", []).append(effective_l(opt))
            evaluate_and_save(step)
            clock.start()
        if on_step is not None:
            on_step(result)
    result.done = True
    return result


def _record_ns_stats(result: RunResult, opt: Muon) -> None:
    """Append the last step's NS statistics (``Muon.recompute_stats``), reduced over the Muon groups."""
    stats = opt.recompute_stats()
    for key in ("orth_error", "sigma_min", "sigma_max", "epsilon", "chi"):
        values = [v for k, v in stats.items() if k.endswith("/" + key)]
        if values:
            result.ns_stats.setdefault(key, []).append(min(values) if key == "sigma_min" else max(values))


def orthogonalized_matrices(opt: Muon, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The matrices ``opt``'s last step orthogonalized, rebuilt in ``dtype`` from each Muon parameter's gradient
    and momentum buffer (the Nesterov blend ``g.lerp(buf, momentum)``, or the buffer) and viewed as the step views
    them (conv kernels flattened, split into parts). Parameters without a gradient or a buffer are left out."""
    from ..optim.parts import matrix_parts
    from ..optim.probe import step_updates

    for group in opt.param_groups:
        if group.get("algorithm") == "muon":
            for _, u in step_updates(opt, group, dtype):
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

    def finished(key: str) -> bool:
        return key in results and results[key].done

    if not all(finished(run_key(name, s, seeds)) for name, s in runs):
        warm_up(task, seed)
    for name, run_seed in runs:
        key = run_key(name, run_seed, seeds)
        if finished(key):
            continue
        ckpt = out_dir / f"checkpoint-{key.replace('/', '-')}.pt" if out_dir is not None else None
        resume = _load_checkpoint(ckpt) if ckpt is not None and ckpt.exists() else None
        done_before = resume["result"]["eval_steps"][-1] if resume else 0
        bar = tqdm(total=steps, initial=done_before, desc=f"{key:<8}", disable=not progress or None, leave=True)
        shown = [0]  # evaluations shown in the bar's postfix (training losses are read at evaluations)

        def tick(r: RunResult, bar: Any = bar, shown: list[int] = shown) -> None:
            bar.update(1)
            if len(r.eval_steps) != shown[0] and r.train_loss:
                shown[0] = len(r.eval_steps)
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
