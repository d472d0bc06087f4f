"""Where a Muon step's GPU time goes: matmul floor, NS alone, and a kernel-level profile of the whole step.

For one matrix set (default GPT-2 small) this prints and writes to JSON:

* ``floor``: the batched bf16 matmuls one NS step is made of, each timed alone (cuBLAS), and the NS5
  time they add up to: the best a torch-matmul NS can do on these shapes;
* ``ns``: ``NSCall.run`` on each same-shape batch, eager and replayed from a CUDA graph (no
  launch overhead), plain and Gram NS;
* ``profile``: the whole ``step()`` (eager and under ``torch.compile``) under ``torch.profiler``, with
  the CUDA time per kernel class (gemm, elementwise, reduction, copy) and the top kernels.

    python benchmarks/dev/profile_step.py --out profile_step_h100.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from collections.abc import Callable
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, matmul_peak_tflops, time_ms, write_json
from _trace import kernel_kind
from step import SETS, make_params, split_groups

import muonkit
from muonkit.accel import kernels
from muonkit.coefficients import as_preset
from muonkit.newton_schulz import NSCall


def graphed(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def batches(layers: int, shapes: list[tuple[int, int]], split_qkv: bool) -> dict[tuple[int, int], int]:
    """Same-shape batches (m <= n after transposing) the step orthogonalizes."""
    count: dict[tuple[int, int], int] = collections.Counter()
    for rows, cols in shapes:
        parts = 3 if split_qkv and rows == 3 * cols else 1
        m, n = sorted((rows // parts, cols))
        count[(m, n)] += parts * layers
    return dict(count)


def profile(step: Callable[[], Any], reps: int = 5) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    # host time per step: queue the steps behind a long GPU sleep, so the host never waits for the GPU
    torch.cuda._sleep(2_000_000_000)
    start = time.perf_counter()
    for _ in range(reps):
        step()
    host_ms = (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for evt in p.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[evt.name][0] += evt.device_time / 1e3 / reps  # ms per step
            per_kernel[evt.name][1] += 1 / reps
    by_kind: dict[str, float] = collections.defaultdict(float)
    launches: dict[str, float] = collections.defaultdict(float)
    for name, (ms, calls) in per_kernel.items():
        by_kind[kernel_kind(name)] += ms
        launches[kernel_kind(name)] += calls
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "host_ms_per_step": host_ms,
        "gpu_ms_per_step": sum(by_kind.values()),
        "by_kind_ms": dict(by_kind),
        "launches_by_kind": dict(launches),
        "top": [{"kernel": k[:120], "ms": v[0], "calls": v[1]} for k, v in top],
    }


def ns_reference(G: torch.Tensor, rows: list) -> torch.Tensor:
    """The same NS polynomials in float64 (the accuracy yardstick for the half-precision paths)."""
    with_kernels = kernels.get_mode()
    kernels.set_mode("torch")
    try:
        return NSCall.of(rows, 1.0, 1e-7, torch.float64, "newton_schulz", None).run(G.double(), fresh=True)
    finally:
        kernels.set_mode(with_kernels)


def ns_section(dev: torch.device, rows: list, batches: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    graphs = muonkit.accel.cuda_graphs.cuda_graphs_enabled()
    muonkit.accel.cuda_graphs.set_cuda_graphs(False)  # "eager" means eager here; the graph column captures itself
    out = []
    for b, m, n in batches:
        G = torch.randn(b, m, n, device=dev)
        ref = ns_reference(G, rows)
        for method in ("newton_schulz", "gram"):
            for mode in ("torch", "triton"):
                kernels.set_mode(mode)
                run = functools.partial(NSCall.of(rows, 1.0, 1e-7, torch.bfloat16, method, None).run, G, True)
                err = float((run().double() - ref).norm() / ref.norm())
                eager, graph = time_ms(run, dev, reps=30), time_ms(graphed(run), dev, reps=30)
                rec = {"batch": b, "shape": [m, n], "method": method, "kernels": mode, "rel_err_vs_fp64": err,
                       "eager_ms": eager, "graph_ms": graph}  # fmt: skip
                out.append(rec)
                print(f"  NS {b}x{m}x{n} {method:<14} {mode:<6} eager {rec['eager_ms']:.3f} ms  "
                      f"graph {rec['graph_ms']:.3f} ms  err {err:.4f}")  # fmt: skip
        kernels.set_mode("auto")
    muonkit.accel.cuda_graphs.set_cuda_graphs(graphs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="gpt2-small", choices=sorted(SETS))
    ap.add_argument("--variants", default="eager-nographs:newton_schulz:auto,eager:newton_schulz:auto,"
                    "default:newton_schulz:torch,default:newton_schulz:triton,"
                    "reduce-overhead:newton_schulz:torch,reduce-overhead:newton_schulz:triton,"
                    "reduce-overhead:gram:triton",
                    help="comma-separated compile-mode:method:kernel-mode[:flag...] variants (flags: fp16, nofused, "
                         "nosplit); compile-mode "
                         "'eager' replays cached CUDA graphs of the NS calls, 'eager-nographs' does not")  # fmt: skip
    ap.add_argument("--skip-ns", action="store_true")
    ap.add_argument("--out", default="profile_step.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    dev = torch.device("cuda")
    env = environment(dev)
    peak = matmul_peak_tflops(dev)
    print(f"{env['gpu']}, torch {env['torch']}, bf16 matmul peak {peak:.0f} TFLOP/s")
    layers, shapes = SETS[args.set]
    result: dict[str, Any] = {"environment": env, "set": args.set, "peak_tflops": peak, "floor": []}

    rows = as_preset("jordan").schedule(5)
    floor_total = 0.0
    merged = batches(layers, shapes, split_qkv=True)
    for (m, n), b in merged.items():
        X = torch.randn(b, m, n, device=dev, dtype=torch.bfloat16)
        A = torch.randn(b, m, m, device=dev, dtype=torch.bfloat16)
        xxt = time_ms(graphed(functools.partial(torch.matmul, X, X.mT)), dev, reps=50)
        aa = time_ms(graphed(functools.partial(torch.baddbmm, A, A, A)), dev, reps=50)
        bx = time_ms(graphed(functools.partial(torch.baddbmm, X, A, X)), dev, reps=50)
        plain = time_ms(graphed(functools.partial(torch.bmm, A, X)), dev, reps=50)
        ns5 = 5 * (xxt + aa + bx)
        floor_total += ns5
        flops = 5 * b * (4 * m * m * n + 2 * m**3)
        rec = {"batch": b, "shape": [m, n], "xxt_ms": xxt, "aa_ms": aa, "bx_ms": bx, "plain_bx_ms": plain,
               "ns5_sum_ms": ns5, "ns5_tflops": flops / ns5 / 1e9}  # fmt: skip
        result["floor"].append(rec)
        print(f"floor {b}x{m}x{n} (CUDA graphs): XX^T {xxt:.3f}  AA+bias {aa:.3f}  BX+bias {bx:.3f}  BX plain "
              f"{plain:.3f} ms -> NS5 {ns5:.3f} ms ({rec['ns5_tflops']:.0f} TFLOP/s)")  # fmt: skip
    result["floor_total_ms"] = floor_total
    print(f"floor, all batches: {floor_total:.3f} ms")
    if not args.skip_ns:
        per_group = [(36, 768, 768), (12, 768, 768), (12, 768, 3072)]
        result["ns"] = ns_section(dev, rows, [(b, m, n) for (m, n), b in merged.items()] + per_group)

    params = make_params(layers, shapes, dev)
    result["profile"] = {}
    for variant in args.variants.split(","):
        # optional further fields: "fp16", "nofused", "nosplit" (the fused QKV whole)
        compile_mode, method, kmode, *rest = variant.split(":")
        kernels.set_mode(kmode)
        muonkit.accel.fused.set_fused("nofused" not in rest)
        ns_dtype = torch.float16 if "fp16" in rest else None
        muonkit.accel.cuda_graphs.set_cuda_graphs(compile_mode != "eager-nographs")
        try:
            groups = params if "nosplit" in rest else split_groups(params)
            opt = muonkit.Muon(groups, nonfinite="ignore", method=method, ns_dtype=ns_dtype)
            opt.step()
            fn = opt.step if compile_mode.startswith("eager") else torch.compile(opt.step, mode=compile_mode)
            rec = profile(fn)
            rec["wall_ms"] = time_ms(fn, dev, reps=20)
        except Exception as err:  # a variant that fails is reported, the others still run
            result["profile"][variant] = {"error": repr(err)[:500]}
            print(f"\n{variant}: FAILED {err!r}"[:600])
            continue
        result["profile"][variant] = rec
        print(f"\n{variant}: wall {rec['wall_ms']:.2f} ms, GPU busy {rec['gpu_ms_per_step']:.2f} ms, "
              f"host {rec['host_ms_per_step']:.2f} ms")  # fmt: skip
        for k, v in rec["by_kind_ms"].items():
            print(f"  {k:<18} {v:7.3f} ms  {rec['launches_by_kind'][k]:5.0f} launches")
        for t in rec["top"][:6]:
            print(f"    {t['ms']:7.3f} ms {t['calls']:5.1f}x  {t['kernel'][:90]}")
        del opt
        torch._dynamo.reset()
    kernels.set_mode("auto")
    if hasattr(torch.optim, "Muon"):
        tm = torch.optim.Muon(params, lr=0.02, adjust_lr_fn="original")
        result["torch.optim.Muon_ms"] = time_ms(tm.step, dev, reps=10)
        print(f"\ntorch.optim.Muon step {result['torch.optim.Muon_ms']:.2f} ms")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
