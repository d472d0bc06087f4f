"""A real training loop, and what each piece of ``muonkit.accel`` buys in it.

The demo's byte-level GPT (``--size large``: 12 layers, width 768, context 512) trains on random bytes with
bf16 autocast, gradient clipping and ``zero_grad(set_to_none=True)``; the optimizer is what the README example
builds: ``Muon(param_groups(model, split={"*.qkv.weight": 3}), lr=0.02, weight_decay=0.01, adamw_lr=3e-4)``
with default options. Each variant starts from the same weights and batches, runs ``--warmup`` iterations
(the first step tunes and captures), then times ``--steps`` iterations with CUDA events: the whole iteration
(forward, backward, clipping, step) and the optimizer step inside it, medians. Variants switch one piece off
(``accel=False`` all of them); the last column, "off costs", is variant / default - 1 for the whole iteration:
what the piece buys in this loop. Fused AdamW on every parameter is the baseline.

    python benchmarks/train_loop.py --out train_loop_h200.json            # needs CUDA
    python benchmarks/train_loop.py --size tiny --steps 3 --warmup 1      # a quick run on any device
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _common import environment, write_json

import muonkit
from muonkit.accel import cuda_graphs, fused, kernels
from muonkit.train.model import GPT, SIZES

# name -> (Muon keyword arguments, setting applied for the run and undone after)
VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "muonkit (defaults)": ({}, None),
    "accel=False": ({"accel": False}, None),
    "fused passes off": ({}, "fused"),
    "CUDA graphs off": ({}, "graphs"),
    "Triton kernels off": ({}, "kernels"),
    "one stream": ({}, "streams"),
    "AdamW (fused)": ({}, None),
}


def _setting(which: str | None, on: bool) -> None:
    if which == "fused":
        fused.set_fused(on)
    elif which == "graphs":
        cuda_graphs.set_cuda_graphs(on)
    elif which == "kernels":
        kernels.set_mode("auto" if on else "torch")
    elif which == "streams":
        cuda_graphs.set_concurrent_batches(on)


def _optimizer(name: str, model: torch.nn.Module, kwargs: dict[str, Any], cuda: bool) -> torch.optim.Optimizer:
    if name.startswith("AdamW"):
        return torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01, fused=cuda)
    groups = muonkit.param_groups(model, split={"*.qkv.weight": 3})
    return muonkit.Muon(groups, lr=0.02, weight_decay=0.01, adamw_lr=3e-4, **kwargs)


def run(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    kwargs, which = VARIANTS[name]
    cfg = SIZES[args.size]
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    _setting(which, False)
    cuda_graphs.cache.clear()
    try:
        start = time.perf_counter()
        opt = _optimizer(name, model, kwargs, device.type == "cuda")
        build_s = time.perf_counter() - start
        gen = torch.Generator(device=device).manual_seed(1)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        iters, steps = [], []
        first_s = 0.0
        for i in range(args.warmup + args.steps):
            x = torch.randint(0, 256, (args.batch, cfg.ctx + 1), device=device, generator=gen)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if device.type == "cuda" else None
            t0 = time.perf_counter()
            if events:
                events[0].record()
            with amp:
                loss = model(x[:, :-1], x[:, 1:])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if events:
                events[1].record()
            opt.step()
            if events:
                events[2].record()
                events[2].synchronize()
                iter_ms, step_ms = events[0].elapsed_time(events[2]), events[1].elapsed_time(events[2])
            else:
                step_ms = iter_ms = (time.perf_counter() - t0) * 1e3
            if i == 0:
                first_s = time.perf_counter() - t0
            if i >= args.warmup:
                iters.append(iter_ms)
                steps.append(step_ms)
        final_loss = float(loss.detach())
    finally:
        _setting(which, True)
    return {
        "variant": name,
        "ms_per_iteration": statistics.median(iters),
        "ms_per_optimizer_step": statistics.median(steps),
        "build_s": build_s,
        "first_iteration_s": first_s,
        "final_loss": final_loss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="large", choices=sorted(SIZES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default=None, help="comma-separated variant names, run in that order")
    ap.add_argument("--out", default="train_loop.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    names = args.only.split(",") if args.only else list(VARIANTS)  # in the order given; a name may repeat
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    rows = [run(n, args, device) for n in names]
    base = next((r["ms_per_iteration"] for r in rows if r["variant"] == "muonkit (defaults)"), None)
    print(f"{env.get('gpu', env['cpu'])}, torch {env['torch']}, GPT {args.size}, batch {args.batch}")
    print(f"{'variant':<22} {'ms/iter':>8} {'ms/step':>8} {'build s':>8} {'1st iter s':>10} {'off costs':>10}")
    for r in rows:
        buys = (
            ""
            if base is None or r["variant"].startswith(("muonkit", "AdamW"))
            else f"{r['ms_per_iteration'] / base - 1:+.1%}"
        )
        r["piece_buys"] = None if not buys else r["ms_per_iteration"] / base - 1
        print(
            f"{r['variant']:<22} {r['ms_per_iteration']:>8.2f} {r['ms_per_optimizer_step']:>8.2f} {r['build_s']:>8.2f} "
            f"{r['first_iteration_s']:>10.2f} {buys:>10}"
        )
    write_json(args.out, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
