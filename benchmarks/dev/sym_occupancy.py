"""When the symmetric-product kernel fills too little of the GPU to beat cuBLAS: NS on small batches.

The kernel computes the ``T (T + 1) / 2`` tiles (``T = ceil(m / 128)``) on and above the diagonal of each
``m x m`` product, one program per tile: a single 768-row matrix is 21 programs, on a GPU of 132 SMs. cuBLAS
computes the whole product with smaller tiles and more of the SMs busy. This program times
``orthogonalize`` (Jordan x5, bf16, the default method) on batches of ``b`` matrices with the kernel wherever
it can run (mode ``"triton"``) and with torch's matmuls only (mode ``"torch"``), each as the GPU's time of ten
calls captured in one CUDA graph (no host time), and prints the upper tiles per call against the SM count:
where the kernel stops paying is what ``kernels.AUTO_MIN_TILES`` encodes.

    python benchmarks/dev/sym_occupancy.py --out benchmarks/dev/results/sym_occupancy_h200.json
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import _parent  # noqa: F401  (benchmarks/ on sys.path)
import torch
from _common import environment, write_json

import muonkit
from muonkit.accel import kernels

SHAPES = [(512, 512), (512, 2048), (768, 768), (768, 3072), (1024, 1024), (1024, 4096), (1536, 1536), (2048, 2048)]
BATCHES = [1, 2, 3, 4, 6, 8]
CALLS = 10  # per captured graph


def gpu_ms(fn: Any, reps: int = 7) -> float:
    """Median GPU milliseconds of one ``fn()``: ``CALLS`` calls captured in a graph, replayed ``reps`` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), kernels.capture_warmup():
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS):
            fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sym_occupancy.json")
    ap.add_argument("--shapes", default=None, help="e.g. 768x768,768x3072")
    ap.add_argument("--batches", default=None, help="e.g. 1,2,4")
    args = ap.parse_args()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    batches = [int(b) for b in args.batches.split(",")] if args.batches else BATCHES
    rows = []
    print(f"{torch.cuda.get_device_name(device)}, {sms} SMs; GPU ms per orthogonalize call (Jordan x5, bf16)")
    print(f"{'batch':>5} {'shape':>11} {'tiles':>6} {'tiles/SMs':>9} {'kernel':>8} {'torch':>8} {'kernel/torch':>12}")
    before = kernels.get_mode()
    try:
        for m, n in shapes:
            for b in batches:
                G = torch.randn(b, m, n, device=device)
                tiles = kernels.upper_tiles(b, min(m, n))
                ms = {}
                for mode in ("triton", "torch"):
                    kernels.set_mode(mode)
                    ms[mode] = gpu_ms(lambda G=G: muonkit.orthogonalize(G, "jordan", 5))
                ratio = ms["triton"] / ms["torch"]
                rows.append({"batch": b, "shape": [m, n], "tiles": tiles, "sms": sms, "kernel_ms": ms["triton"],
                             "torch_ms": ms["torch"], "kernel_over_torch": ratio})  # fmt: skip
                print(f"{b:>5} {m:>5}x{n:<5} {tiles:>6} {tiles / sms:>9.2f} {ms['triton']:>8.4f} {ms['torch']:>8.4f} "
                      f"{ratio:>12.2f}")  # fmt: skip
    finally:
        kernels.set_mode(before)
    write_json(args.out, {"environment": environment(device), "sms": sms, "rows": rows})


if __name__ == "__main__":
    main()
