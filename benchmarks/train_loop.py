"""A real training loop, and what each piece of ``muonkit.accel`` buys in it.

The demo's byte-level GPT (``--size large``: 12 layers, width 768, context 512) trains on random bytes with
bf16 autocast, gradient clipping, ``zero_grad(set_to_none=True)`` and an lr scheduler stepped every iteration
(warmup, then cosine); the optimizer is what the README example builds:
``Muon(param_groups(model, split={"*.qkv.weight": 3}), lr=0.02, weight_decay=0.01, adamw_lr=3e-4)``
with default options. Each variant starts from the same weights and batches, runs ``--warmup`` iterations
(the first step tunes and captures), then times ``--steps`` iterations with CUDA events: the whole iteration
(forward, backward, clipping, step) and the optimizer step inside it, medians; the step's share of the
iteration and its ratio to fused AdamW's step; the first iteration's extra seconds over a later one (fused
AdamW runs first, unrecorded, so that the process's own start-up lands on no variant); the optimizer state, the
most memory a step allocated beyond what was allocated before it, and the memory of muonkit's cached CUDA
graphs. Variants switch one piece off
(``accel=False`` all of them); the last column, "off costs", is variant / default - 1 for the whole iteration:
what the piece buys in this loop. The baselines, each with its own standard recipe: fused AdamW on every parameter;
torch.optim.Muon (its defaults, "original" shape scale, the fused QKV as one matrix) on the matrices that
``param_groups`` gives Muon, fused AdamW on the rest; KellerJordan's ``SingleDeviceMuon`` likewise, where its
``muon-optimizer`` wheel is installed (skipped, and said so, where not). With ``--paired`` each variant
runs alternating with the defaults, iteration by iteration, in one process (``paired``): the comparison that
decides whether a piece earns its place (at least 3% of an iteration). With ``--profile`` each variant's
``--steps`` iterations run under torch.profiler instead, and the optimizer step of each is taken apart
(``_trace``): host time, time the host waited for the GPU, the step's GPU work, the GPU's idle time inside
the step (a step bound by its host shows there), the host time before the first launch and how long the GPU
waited for it.

    python benchmarks/train_loop.py --out train_loop_h200.json            # needs CUDA
    python benchmarks/train_loop.py --paired --out train_loop_paired.json # what each piece buys, paired
    python benchmarks/train_loop.py --paired --only "AdamW (fused)" --out p.json  # the step ratio, side by side
    python benchmarks/train_loop.py --profile --only "muonkit (defaults),AdamW (fused)" --steps 10 --out p.json
    python benchmarks/train_loop.py --size tiny --steps 3 --warmup 1      # a quick run on any device
    python benchmarks/train_loop.py --qkv separate --out train_loop_separate_qkv_h200.json  # q, k, v apart
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import tempfile
import time
from typing import Any

import torch
from _common import competitors, environment, write_json
from _trace import step_windows, summarise
from torch.profiler import ProfilerActivity, profile, record_function

import muonkit
from muonkit.accel import cuda_graphs, fused, guards, kernels
from muonkit.train.model import GPT, SIZES
from muonkit.train.optimizers import Combined, hidden_matrices

# name -> (Muon keyword arguments, setting applied while the variant runs and undone after)
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "muonkit (defaults)": ({}, None),
    "accel=False": ({"accel": False}, None),
    "fused passes off": ({}, "fused"),
    "CUDA graphs off": ({}, "graphs"),
    "Triton kernels off": ({}, "kernels"),
    "tensor guards off": ({}, "guards"),
    "plain NS everywhere": ({"method": "newton_schulz"}, None),  # the default ("auto") runs Gram NS on wide matrices
    "non-finite check off": ({"nonfinite": "ignore"}, None),  # the default checks on the GPU from the 2nd step on
    "NS batches whole": ({"max_batch": 1 << 30}, None),  # the default cuts batches so the graph pool stays small
    "AdamW (fused)": ({}, None),
    "torch.optim.Muon + AdamW": ({}, None),
    "KellerJordan SingleDeviceMuon + AdamW": ({}, None),
}
BASELINES = ("AdamW (fused)", "torch.optim.Muon + AdamW", "KellerJordan SingleDeviceMuon + AdamW")
STEP_RANGE = "train_loop: optimizer step"  # the profiler range around every optimizer step (``--profile``)
_GUARDS_AVAILABLE = guards.available


def _setting(which: str | None, on: bool) -> None:
    """Switch one piece on or off. ``guards``: torch's private C++ tensor guards, and with them remembered plans
    and repeated steps (``accel.guards``, ``optim.remembered``, ``optim.repeat``)."""
    if which == "fused":
        fused.set_fused(on)
    elif which == "graphs":
        cuda_graphs.set_cuda_graphs(on)
    elif which == "kernels":
        kernels.set_mode("auto" if on else "torch")
    elif which == "guards":
        guards.available = _GUARDS_AVAILABLE if on else (lambda: False)  # type: ignore[method-assign]


def _optimizer(name: str, model: torch.nn.Module, kwargs: dict[str, Any], cuda: bool) -> torch.optim.Optimizer:
    if name == "AdamW (fused)":
        return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=cuda)
    if name in BASELINES:  # another Muon on the matrices muonkit would give Muon, fused AdamW on the rest
        matrices, rest = hidden_matrices(model)
        if name.startswith("torch.optim.Muon"):
            muon: torch.optim.Optimizer = torch.optim.Muon(
                matrices, lr=0.02, weight_decay=0.01, adjust_lr_fn="original"
            )
        else:
            muon = competitors()["KellerJordan"].SingleDeviceMuon(matrices, lr=0.02, weight_decay=0.01)
        adamw = torch.optim.AdamW(rest, lr=3e-4, weight_decay=0.01, fused=cuda)
        return Combined(muon, adamw)
    fused_qkv = any(n.endswith("qkv.weight") for n, _ in model.named_parameters())
    groups = muonkit.param_groups(model, split={"*.qkv.weight": 3} if fused_qkv else None)
    return muonkit.Muon(groups, lr=0.02, weight_decay=0.01, adamw_lr=3e-4, **kwargs)


class SeparateQKV(torch.nn.Module):
    """Three ``d x d`` projections (``q``, ``k``, ``v``) where the model has one fused ``qkv``; the same output
    (their results side by side) and, made from a fused layer, the same weights."""

    def __init__(self, fused_qkv: torch.nn.Linear) -> None:
        super().__init__()
        d = fused_qkv.in_features
        self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=False) for _ in range(3))
        with torch.no_grad():
            for part, rows in zip((self.q, self.k, self.v), fused_qkv.weight.detach().split(d)):
                part.weight.copy_(rows)
        self.to(fused_qkv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def separate_qkv(model: torch.nn.Module) -> None:
    """Give every attention of ``model`` separate Q, K and V projections (``--qkv separate``): Muon then gets three
    square matrices per layer without a ``split``, and torch.optim.Muon orthogonalizes each on its own too."""
    for module in list(model.modules()):
        if isinstance(getattr(module, "qkv", None), torch.nn.Linear):
            module.qkv = SeparateQKV(module.qkv)


def _lr_factor(t: int, warmup: int = 20, total: int = 2000) -> float:
    """Linear warmup over ``warmup`` iterations, then cosine decay to 0 at ``total``."""
    if t < warmup:
        return (t + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(t - warmup, total) / total))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (every part's, for a combination of optimizers)."""
    parts = getattr(opt, "optimizers", (opt,))
    return sum(
        t.nbytes for o in parts for state in o.state.values() for t in state.values() if isinstance(t, torch.Tensor)
    )


class Trainer:
    """One variant's model, optimizer and batches, stepped one iteration at a time (with its setting applied
    during the iteration only, so that two trainers may alternate in one process)."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device) -> None:
        self.name, self.device, self.args = name, device, args
        kwargs, self.which = VARIANTS[name]
        self.cfg = SIZES[args.size]
        torch.manual_seed(0)
        self.model = GPT(self.cfg).to(device)
        if args.qkv == "separate":
            separate_qkv(self.model)
        _setting(self.which, False)
        try:
            start = time.perf_counter()
            self.opt = _optimizer(name, self.model, kwargs, device.type == "cuda")
            self.build_s = time.perf_counter() - start
        finally:
            _setting(self.which, True)
        # the lr changes every iteration, as in a real run: linear warmup, then cosine decay
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_factor)
        self.gen = torch.Generator(device=device).manual_seed(1)
        self.iters: list[float] = []
        self.steps: list[float] = []
        self.peak_extra = 0  # the most memory a step allocated beyond what was allocated before it (CUDA)
        self.first_s = 0.0
        self.count = 0
        self.loss = float("nan")

    def iteration(self) -> tuple[float, float]:
        """One iteration (forward, backward, clipping, step); ``(ms for all of it, ms of the step)``, kept after
        ``--warmup`` iterations."""
        args, device = self.args, self.device
        x = torch.randint(0, 256, (args.batch, self.cfg.ctx + 1), device=device, generator=self.gen)
        cuda = device.type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if cuda else None
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        _setting(self.which, False)
        try:
            t0 = time.perf_counter()
            if events:
                events[0].record()
            with amp:
                loss = self.model(x[:, :-1], x[:, 1:])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            if events:
                events[1].record()
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            with record_function(STEP_RANGE):
                self.opt.step()
            self.sched.step()
            if events:
                self.peak_extra = max(self.peak_extra, torch.cuda.max_memory_allocated(device) - before)
                events[2].record()
                events[2].synchronize()
                iter_ms, step_ms = events[0].elapsed_time(events[2]), events[1].elapsed_time(events[2])
            else:
                step_ms = iter_ms = (time.perf_counter() - t0) * 1e3
        finally:
            _setting(self.which, True)
        if self.count == 0:
            self.first_s = time.perf_counter() - t0
        if self.count >= args.warmup:
            self.iters.append(iter_ms)
            self.steps.append(step_ms)
        self.count += 1
        self.loss = float(loss.detach())
        return iter_ms, step_ms

    def row(self) -> dict[str, Any]:
        iteration, step = statistics.median(self.iters), statistics.median(self.steps)
        return {
            "variant": self.name,
            "ms_per_iteration": iteration,
            "ms_per_optimizer_step": step,
            "step_share": step / iteration,
            "build_s": self.build_s,
            "first_iteration_s": self.first_s,
            "later_iteration_s": iteration / 1e3,
            "state_mb": _state_bytes(self.opt) / 2**20,
            "step_peak_extra_mb": self.peak_extra / 2**20,
            "graphs_mb": cuda_graphs.cache.nbytes / 2**20,
            "final_loss": self.loss,
        }


def run(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One variant alone, ``--warmup`` + ``--steps`` iterations."""
    cuda_graphs.cache.clear()
    trainer = Trainer(name, args, device)
    for _ in range(args.warmup + args.steps):
        trainer.iteration()
    return trainer.row()


def warm_process(args: argparse.Namespace, device: torch.device) -> None:
    """Fused AdamW for ``--warmup`` iterations, unrecorded: the process's one-time costs (CUDA context, the
    model's forward and backward kernels, autocast) then land on no variant's first iteration."""
    trainer = Trainer("AdamW (fused)", args, device)
    for _ in range(max(1, args.warmup)):
        trainer.iteration()


def paired(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The variant and the defaults in one process, alternating iteration by iteration (which goes first
    alternates too), so that slow drifts of the GPU or the host fall on both alike. What the piece buys: the
    median over iterations of (variant - default) for the whole iteration, over the default's median iteration;
    with the quartiles of those differences. Also the defaults' step over the variant's, iteration by iteration
    (median and quartiles): against a baseline (``--only "AdamW (fused)"``) the ratio of the two steps measured
    side by side, which separate processes can disagree on (fused AdamW's step took 0.70 and 1.86 ms in two)."""
    cuda_graphs.cache.clear()
    base, variant = Trainer("muonkit (defaults)", args, device), Trainer(name, args, device)
    for i in range(args.warmup + args.steps):
        for t in (base, variant) if i % 2 == 0 else (variant, base):
            t.iteration()
    diffs = [v - b for v, b in zip(variant.iters, base.iters)]
    step_diffs = [v - b for v, b in zip(variant.steps, base.steps)]
    q1, q2, q3 = statistics.quantiles(diffs, n=4)
    r1, r2, r3 = statistics.quantiles([b / v for v, b in zip(variant.steps, base.steps)], n=4)
    iteration = statistics.median(base.iters)
    return {
        **variant.row(),
        "default_ms_per_iteration": iteration,
        "default_ms_per_optimizer_step": statistics.median(base.steps),
        "diff_ms_per_iteration": {"q1": q1, "median": q2, "q3": q3},
        "diff_ms_per_optimizer_step": statistics.median(step_diffs),
        "default_step_over_variant": {"q1": r1, "median": r2, "q3": r3},
        "piece_buys": q2 / iteration,
    }


def profiled(name: str, args: argparse.Namespace, device: torch.device, trace_path: str) -> dict[str, Any]:
    """``--warmup`` iterations, then ``--steps`` under torch.profiler; each optimizer step taken apart (``_trace``)
    from the range ``STEP_RANGE`` around it. The profiler's own cost inflates host times alike for all."""
    cuda_graphs.cache.clear()
    trainer = Trainer(name, args, device)
    for _ in range(args.warmup):
        trainer.iteration()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.iteration()
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        trace = json.load(f)
    if args.trace_dir:
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        with gzip.open(os.path.join(args.trace_dir, f"trace_{slug}.json.gz"), "wt") as f:
            json.dump(trace, f)
    windows = step_windows(trace, STEP_RANGE)
    return {"variant": name, **summarise(windows), "per_step": windows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="large", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--qkv", default="fused", choices=["fused", "separate"],
                    help="attention's Q, K, V as one fused projection (Muon splits it in three) or three")  # fmt: skip
    ap.add_argument("--only", default=None, help="comma-separated variant names, run in that order")
    ap.add_argument("--paired", action="store_true", help="each variant alternating with the defaults (see paired)")
    ap.add_argument("--profile", action="store_true", help="take each variant's optimizer step apart (see profiled)")
    ap.add_argument("--trace-dir", default=None, help="with --profile: keep each variant's trace there (gzip)")
    ap.add_argument("--out", default="train_loop.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    names = args.only.split(",") if args.only else list(VARIANTS)  # in the order given; a name may repeat
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if "KellerJordan" not in competitors() and BASELINES[2] in names:
        names = [n for n in names if n != BASELINES[2]]
        print(f"skipped {BASELINES[2]!r}: KellerJordan's muon-optimizer wheel is not installed")
    if not hasattr(torch.optim, "Muon") and BASELINES[1] in names:
        names = [n for n in names if n != BASELINES[1]]
        print(f"skipped {BASELINES[1]!r}: torch.optim.Muon needs torch >= 2.9, this is {torch.__version__}")
    print(f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, GPT {args.size} ({args.qkv} QKV), batch {args.batch}")
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [profiled(n, args, device, f"{tmp}/trace.json") for n in names]
        cols = ("host_ms", "wait_ms", "gpu_ms", "span_ms", "idle_ms", "first_launch_ms", "lead_idle_ms", "launches")
        print(f"{'variant':<38}" + "".join(f"{c.replace('_', ' '):>10}" for c in cols) + "  GPU ms by kind")
        for r in rows:
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in r["by_kind_ms"].items())
            print(f"{r['variant']:<38}" + "".join(f"{r[c]:>10.2f}" for c in cols) + f"  {kinds}")
        write_json(args.out, {"environment": env, "args": vars(args), "rows": rows})
        return
    if args.paired:
        pairs = names if args.only else [n for n in names if n not in BASELINES]  # baselines when named
        rows = [paired(n, args, device) for n in pairs if n != "muonkit (defaults)"]
        print(f"{'variant':<38} {'ms/iter':>8} {'default':>8} {'diff q1/med/q3 ms':>20} {'step diff':>10} {'buys':>7}"
              f" {'default/variant step':>21}")  # fmt: skip
        for r in rows:
            d, q = r["diff_ms_per_iteration"], r["default_step_over_variant"]
            print(
                f"{r['variant']:<38} {r['ms_per_iteration']:>8.2f} {r['default_ms_per_iteration']:>8.2f} "
                f"{d['q1']:>6.2f}/{d['median']:>5.2f}/{d['q3']:>5.2f} {r['diff_ms_per_optimizer_step']:>10.2f} "
                f"{r['piece_buys']:>+7.1%} {q['q1']:>7.2f}/{q['median']:>5.2f}/{q['q3']:>5.2f}"
            )
        write_json(args.out, {"environment": env, "args": vars(args), "rows": rows})
        return
    warm_process(args, device)
    rows = [run(n, args, device) for n in names]
    base = next((r["ms_per_iteration"] for r in rows if r["variant"] == "muonkit (defaults)"), None)
    adamw = next((r["ms_per_optimizer_step"] for r in rows if r["variant"] == "AdamW (fused)"), None)
    print(f"{'variant':<38} {'ms/iter':>8} {'ms/step':>8} {'share':>6} {'x AdamW':>8} {'build s':>8} "
          f"{'1st +s':>7} {'state MB':>9} {'peak+ MB':>9} {'graph MB':>9} {'off costs':>10}")  # fmt: skip
    for r in rows:
        buys = (
            ""
            if base is None or r["variant"] == "muonkit (defaults)" or r["variant"] in BASELINES
            else f"{r['ms_per_iteration'] / base - 1:+.1%}"
        )
        r["piece_buys"] = None if not buys else r["ms_per_iteration"] / base - 1
        r["step_vs_fused_adamw"] = None if adamw is None else r["ms_per_optimizer_step"] / adamw
        r["first_iteration_extra_s"] = r["first_iteration_s"] - r["later_iteration_s"]
        ratio = "" if adamw is None else f"{r['step_vs_fused_adamw']:.2f}"
        print(
            f"{r['variant']:<38} {r['ms_per_iteration']:>8.2f} {r['ms_per_optimizer_step']:>8.2f} "
            f"{r['step_share']:>6.1%} {ratio:>8} {r['build_s']:>8.2f} {r['first_iteration_extra_s']:>7.2f} "
            f"{r['state_mb']:>9.0f} {r['step_peak_extra_mb']:>9.0f} {r['graphs_mb']:>9.0f} {buys:>10}"
        )
    write_json(args.out, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
