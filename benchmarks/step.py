"""Whole optimizer step: muonkit vs torch.optim.Muon, KellerJordan's SingleDeviceMuon and AdamW.

Matrix sets: ``gpt2-small`` (12 x [2304x768 fused QKV, 768x768, 3072x768, 768x3072]), ``1b``
(16 x [6144x2048 fused QKV, 2048x2048, 8192x2048, 2048x8192], 0.8B parameters) and ``demo-small`` (the
whole demo GPT: Muon for hidden matrices plus AdamW for the rest, against AdamW on everything).
fp32 parameters and gradients. Per implementation: ms per step, median of steps each timed alone
(synchronised before and after: host time before the first launch counts) and the mean of steps run back to
back as a training loop runs them ("pipelined"); on CUDA the peak memory a steady-state step allocates beyond
parameters, gradients and optimizer state, and the memory muonkit's cached CUDA graphs hold; and the first
step's error against float64 NS (``first_step_error``). muonkit splits the fused QKV into three matrices as
practised; ``muonkit-nosplit`` and ``muonkit-gram-nosplit`` (``Muon(params)``'s default: no split) orthogonalize
the same matrices as the others.

    python benchmarks/step.py --sets gpt2-small,1b --out benchmarks/results/step_gpt2-small_h100.json
    python benchmarks/step.py --sets demo-small,gpt2-small --out benchmarks/results/step_cpu.json   # CPU
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch
from _common import competitors, environment, sync, time_ms, time_ms_pipelined, write_json

import muonkit
from muonkit.accel import kernels

SETS = {
    "gpt2-small": (12, [(2304, 768), (768, 768), (3072, 768), (768, 3072)]),
    "1b": (16, [(6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192)]),
}


def make_params(layers: int, shapes: list[tuple[int, int]], device: torch.device) -> list[torch.nn.Parameter]:
    params = []
    for _ in range(layers):
        for shape in shapes:
            p = torch.nn.Parameter(torch.randn(shape, device=device) * 0.02)
            p.grad = torch.randn(shape, device=device) * 1e-3
            params.append(p)
    return params


class Compiled:
    """An optimizer whose ``step`` runs under ``torch.compile`` (state created by one eager step first)."""

    def __init__(self, opt: torch.optim.Optimizer, mode: str) -> None:
        self.opt = opt
        opt.step()
        muonkit.accel.cuda_graphs.cache.clear()  # the eager step's graphs: not used by the compiled step
        self.step = torch.compile(opt.step, mode=mode)
        self.state = opt.state


def compiled_muonkit(groups: Callable[[], list], mode: str) -> Compiled:
    return Compiled(muonkit.Muon(groups(), nonfinite="ignore"), mode)


def add_set_arguments(ap: Any, method: str = "newton_schulz") -> None:
    """The options of the programs that time one step of a ``SETS`` entry: ``--set``, ``--method``, ``--nosplit``."""
    ap.add_argument("--set", default="gpt2-small", choices=sorted(SETS))
    ap.add_argument("--method", default=method)
    ap.add_argument("--nosplit", action="store_true", help="the fused QKV matrices whole (default: split in three)")


def split_groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """The fused QKV matrices (3n x n) split in three, the rest whole; fresh dicts on every call, since an
    optimizer writes its defaults into the group dicts it is given."""
    qkv = [p for p in params if p.shape[0] == 3 * p.shape[1]]
    rest = [p for p in params if p.shape[0] != 3 * p.shape[1]]
    return [{"params": qkv, "split": 3}, {"params": rest}]


STAGE_VARIANTS: dict[str, dict[str, Any]] = {
    "aol 4 NS steps": {"precondition": "aol", "ns_steps": 4},
    "schatten4": {"precondition": "schatten4"},
    "row_norm": {"precondition": "row_norm"},
    "normuon": {"postscale": "normuon"},
    "cautious": {"update": "cautious", "weight_decay": 0.01},
    "decoupled wd 0.01": {"weight_decay": 0.01},  # what the cautious row compares against
}


def optimizers(
    params: list[torch.nn.Parameter], device: torch.device
) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    groups = functools.partial(split_groups, params)
    opts: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "muonkit": lambda: muonkit.Muon(groups(), nonfinite="ignore"),
        "muonkit [plain NS]": lambda: muonkit.Muon(groups(), method="newton_schulz", nonfinite="ignore"),
        "muonkit-nonfinite-check": lambda: muonkit.Muon(groups()),
        "muonkit-gram": lambda: muonkit.Muon(groups(), method="gram", nonfinite="ignore"),
        "muonkit-nosplit": lambda: muonkit.Muon(params, nonfinite="ignore"),
        "muonkit-gram-nosplit": lambda: muonkit.Muon(params, method="gram", nonfinite="ignore"),
        # Gram NS with Dao-AILab's restart before step 2 (muonkit's default for 5 steps: before step 3)
        "muonkit-gram-nosplit [restart 2]": lambda: muonkit.Muon(
            params, method="gram", restarts=[2], nonfinite="ignore"
        ),
    }
    # the step pipeline's shipped stages, one at a time (the precondition stages run in the fused step; NorMuon and
    # cautious decay take the torch path)
    for name, kw in STAGE_VARIANTS.items():
        opts[f"muonkit [{name}]"] = functools.partial(lambda kw: muonkit.Muon(groups(), nonfinite="ignore", **kw), kw)
    if device.type == "cuda":
        for mode in ("default", "reduce-overhead"):
            opts[f"muonkit+compile({mode})"] = functools.partial(compiled_muonkit, groups, mode)
        # the same without the Triton symmetric-product kernel (torch matmuls only)
        opts["muonkit+compile(reduce-overhead) [kernels=torch]"] = functools.partial(
            compiled_muonkit, groups, "reduce-overhead"
        )
        opts["muonkit [kernels=torch]"] = lambda: muonkit.Muon(groups(), nonfinite="ignore")
        opts["muonkit [graphs off]"] = lambda: muonkit.Muon(groups(), nonfinite="ignore")
        # bf16: the NS input divided by its norm in a pass of its own (default: inside the first products)
        opts["muonkit-gram [no fold]"] = lambda: muonkit.Muon(groups(), method="gram", nonfinite="ignore")
        opts["muonkit [no fold]"] = lambda: muonkit.Muon(groups(), nonfinite="ignore")
        # Gram NS in float16: the gram-newton-schulz package's choice, as accurate as plain NS in bf16
        opts["muonkit-gram [fp16]"] = lambda: muonkit.Muon(
            groups(), method="gram", ns_dtype=torch.float16, nonfinite="ignore"
        )
        opts["muonkit-gram [fp16]+compile(reduce-overhead)"] = lambda: Compiled(
            muonkit.Muon(groups(), method="gram", ns_dtype=torch.float16, nonfinite="ignore"), "reduce-overhead"
        )
        # the same without the fused element-wise kernels (momentum/normalise and update through torch ops)
        for name in ("muonkit", "muonkit+compile(reduce-overhead)", "muonkit-gram [fp16]+compile(reduce-overhead)"):
            opts[f"{name} [fused off]"] = opts[name]
    comp = competitors()
    if "torch.optim.Muon" in comp:
        opts["torch.optim.Muon"] = lambda: torch.optim.Muon(params, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    if "KellerJordan" in comp:
        opts["KellerJordan"] = lambda: comp["KellerJordan"].SingleDeviceMuon(params, lr=0.02)
    fused = device.type == "cuda"
    opts["AdamW" + (" (fused)" if fused else " (foreach)")] = lambda: torch.optim.AdamW(
        params, lr=1e-3, fused=fused or None, foreach=None if fused else True
    )
    return opts


def ill_conditioned_grads(params: list[torch.nn.Parameter], seed: int = 0) -> list[torch.Tensor]:
    """Gradients of the parameters' shapes with singular values log-spaced over [1e-7, 1e-3] (a decaying
    spectrum, as gradients have; the Gaussian ones the timing uses have a flat one)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for p in params:
        rows, cols = p.shape
        k = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen, dtype=torch.float64).to(p.device))
        V, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen, dtype=torch.float64).to(p.device))
        s = torch.logspace(-7, -3, k, dtype=torch.float64, device=p.device)
        out.append(((U * s[torch.randperm(k, generator=gen).to(p.device)]) @ V.mT).to(p.dtype))
    return out


def with_grads(params: list[torch.nn.Parameter], grads: list[torch.Tensor], fn: Callable[[], float]) -> float:
    """``fn()`` with the parameters' gradients replaced by ``grads`` (the originals put back after)."""
    saved = [p.grad for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    try:
        return fn()
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def first_step_error(make: Callable[[], Any], params: list[torch.nn.Parameter], split_qkv: bool) -> float:
    """Relative error (Frobenius, over all matrices) of a fresh optimizer's first update, divided by its lr and
    shape scale (``"original"``: ``sqrt(max(1, rows / cols))``), against 5 NS steps with the same coefficients in
    float64 (``muonkit.orthogonalize``), per QKV part when the implementation splits them. With zero momentum
    every implementation here orthogonalizes a multiple of the gradient, so this measures its NS arithmetic
    alone. The parameters are restored afterwards."""
    saved = [p.detach().clone() for p in params]
    opt = make()
    opt.step()
    err2 = ref2 = 0.0
    for p, p0 in zip(params, saved):
        rows, cols = p.shape
        n_parts = 3 if split_qkv and rows == 3 * cols else 1
        for delta, g in zip((p0 - p.detach()).double().chunk(n_parts), p.grad.double().chunk(n_parts)):
            d = delta / (0.02 * max(1.0, g.shape[0] / g.shape[1]) ** 0.5)
            ref = muonkit.orthogonalize(g, "jordan", steps=5, dtype=torch.float64)
            err2 += float((d - ref).square().sum())
            ref2 += float(ref.square().sum())
        p.data.copy_(p0)
    del opt
    return (err2 / ref2) ** 0.5


def demo_small_optimizers(device: torch.device) -> tuple[list[torch.nn.Parameter], dict[str, Callable]]:
    from muonkit.train import GPT, SIZES

    model = GPT(SIZES["small"]).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    params = list(model.parameters())
    hidden = [p for pl in muonkit.classify(model) if pl.algorithm == "muon" for p in [pl.param]]
    other = [p for p in params if all(p is not h for h in hidden)]
    opts: dict[str, Callable] = {
        "muonkit (Muon+AdamW groups)": lambda: muonkit.Muon(
            muonkit.param_groups(model, split={"*.qkv.weight": 3}), nonfinite="ignore"
        ),
        "muonkit (default nonfinite check)": lambda: muonkit.Muon(
            muonkit.param_groups(model, split={"*.qkv.weight": 3})
        ),
        "AdamW (foreach)": lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
    }
    if hasattr(torch.optim, "Muon"):

        class Pair:
            def __init__(self) -> None:
                self.a = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
                self.b = torch.optim.AdamW(other, lr=1e-3, foreach=True)

            def step(self) -> None:
                self.a.step()
                self.b.step()

        opts["torch.optim.Muon + AdamW"] = Pair  # type: ignore[assignment]
    return params, opts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default="gpt2-small,1b")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", default=None, help="comma-separated implementation names to run")
    ap.add_argument("--out", default="step.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"{env.get('gpu', env['cpu'])}, torch {env['torch']}")
    rows: list[dict[str, Any]] = []
    ill: dict[str, list[torch.Tensor]] = {}
    for set_name in args.sets.split(","):
        if set_name == "demo-small":
            params, opts = demo_small_optimizers(device)
        else:
            layers, shapes = SETS[set_name]
            params = make_params(layers, shapes, device)
            opts = optimizers(params, device)
        n_params = sum(p.numel() for p in params)
        if args.only:
            opts = {k: v for k, v in opts.items() if k in args.only.split(",")}
        for name, make in opts.items():
            kernels.set_mode("torch" if "[kernels=torch]" in name else "auto")
            muonkit.accel.cuda_graphs.set_cuda_graphs("[graphs off]" not in name)
            muonkit.optim.plans._FOLD_NORMALISATION = "[no fold]" not in name
            muonkit.accel.fused.set_fused("[fused off]" not in name)
            muonkit.accel.cuda_graphs.cache.clear()
            torch._dynamo.reset()
            err = err_ill = None
            if set_name in SETS and "compile" not in name and not name.startswith("AdamW"):
                split = name.startswith("muonkit") and "nosplit" not in name
                err = first_step_error(make, params, split_qkv=split)
                if set_name not in ill:
                    ill[set_name] = ill_conditioned_grads(params)
                err_ill = with_grads(params, ill[set_name], functools.partial(first_step_error, make, params, split))
                muonkit.accel.cuda_graphs.cache.clear()
            opt = make()
            opt.step()  # creates state
            opt.step()  # muonkit: captures its whole-batch CUDA graphs (the first step ran eagerly)
            sync(device)
            extra_mb = None
            if device.type == "cuda":
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                opt.step()
                sync(device)
                extra_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = time_ms(opt.step, device, warmup=2, reps=args.reps)
            ms_pipelined = time_ms_pipelined(opt.step, device, warmup=1, reps=args.reps)
            # dozens of steps later: a wrong step (a race, say) shows up as non-finite parameters here
            finite = all(bool(torch.isfinite(p).all()) for p in params)
            if not finite:
                print(f"WARNING: {name}: non-finite parameters after the timed steps")
            state_mb = (
                sum(
                    t.numel() * t.element_size()
                    for s in getattr(opt, "state", {}).values()
                    for t in s.values()
                    if torch.is_tensor(t)
                )
                / 2**20
                if hasattr(opt, "state")
                else None
            )
            rows.append(
                {
                    "set": set_name,
                    "params": n_params,
                    "impl": name,
                    "ms": ms,
                    "ms_pipelined": ms_pipelined,
                    "err_vs_ns_float64": err,
                    "err_ill_conditioned": err_ill,
                    "finite_after_timing": finite,
                    "state_mb": state_mb,
                    "step_extra_mb": extra_mb,
                    "graph_cache_mb": muonkit.accel.cuda_graphs.cache.nbytes / 2**20,
                }
            )
            del opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del params
    print(
        f"\n{'set':<11} {'impl':<34} {'ms/step':>9} {'pipelined':>9} {'x muonkit':>9} {'x AdamW':>8} {'state MB':>9} "
        f"{'step extra MB':>13} {'graphs MB':>9} {'err vs fp64 NS':>14} {'err, ill-cond.':>14}"
    )
    for r in rows:
        same = [x for x in rows if x["set"] == r["set"]]
        mk = next((x["ms"] for x in same if x["impl"].startswith("muonkit")), float("nan"))
        adam = next((x["ms"] for x in same if x["impl"].startswith("AdamW")), float("nan"))
        r["ms_over_muonkit"], r["ms_over_adamw"] = r["ms"] / mk, r["ms"] / adam
        extra = f"{r['step_extra_mb']:.0f}" if r["step_extra_mb"] is not None else "-"
        state = f"{r['state_mb']:.0f}" if r["state_mb"] is not None else "-"
        err = f"{r['err_vs_ns_float64']:.2e}" if r.get("err_vs_ns_float64") is not None else "-"
        err_ill = f"{r['err_ill_conditioned']:.2e}" if r.get("err_ill_conditioned") is not None else "-"
        print(
            f"{r['set']:<11} {r['impl']:<34} {r['ms']:>9.2f} {r['ms_pipelined']:>9.2f} {r['ms_over_muonkit']:>9.2f} "
            f"{r['ms_over_adamw']:>8.2f} {state:>9} {extra:>13} {r['graph_cache_mb']:>9.0f} {err:>14} {err_ill:>14}"
        )
    write_json(args.out, {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
