"""Tables and plots from the distributed runs: step-time ratios against one GPU, and loss curves.

    python benchmarks/distributed_report.py --prefix benchmarks/results/distributed_h200 \\
        --train docs/results/distributed --plot docs/img/distributed_train_h200x2.png

Reads ``{prefix}_{set}_{n}gpu.json`` (written by benchmarks/distributed.py) for every set and world size
found, prints one markdown table per set (ms per step, the ratio to the median 1-GPU step, MB sent, state
per rank) and, with ``--train``, the final losses of examples/distributed_train.py runs and a plot of them.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
from pathlib import Path


def scaling_tables(prefix: str) -> dict[str, list[dict]]:
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(glob.glob(f"{prefix}_*gpu.json")):
        m = re.search(r"_(?P<set>[^_]+)_(?P<n>\d+)gpu\.json$", path)
        if m:
            found.setdefault(m["set"], {})[int(m["n"])] = json.loads(Path(path).read_text())
    tables = {}
    for name, by_world in found.items():
        # every mode does the same work on one GPU: their median is a steadier baseline than any one row
        ones = sorted(r["ms"] for r in by_world[min(by_world)]["rows"])
        base = ones[len(ones) // 2]
        rows = []
        for world in sorted(by_world):
            for r in by_world[world]["rows"]:
                rows.append({**r, "ratio_to_1gpu": r["ms"] / base})
        tables[name] = rows
        env = by_world[min(by_world)]["environment"]
        device = f"{env.get('gpu') or env.get('device', '?')}, torch {env.get('torch', '?')}"
        print(f"\n{name} ({device}); ratio = ms / the median 1-GPU step ({base:.2f} ms)\n")
        print("| GPUs | mode | ms/step | ratio | MB sent/step | state MB/rank | max rel diff vs naive |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['world_size']} | {r['mode']} | {r['ms']:.2f} | {r['ratio_to_1gpu']:.2f} | "
                f"{r['bytes_per_step'] / 2**20:.0f} | {r['state_bytes_per_rank'] / 2**20:.0f} | "
                f"{r['max_rel_diff_vs_first_mode']:.1e} |"
            )
    return tables


def training(folder: str, plot: str | None) -> dict[str, dict]:
    runs = {}
    for path in sorted(Path(folder).glob("train_*.json")):
        d = json.loads(path.read_text())
        runs[f"{d['meta']['mode']} {d['meta']['optimizer']}"] = d
    if not runs:
        return {}
    first = next(iter(runs.values()))["meta"]
    print(
        f"\ntraining: GPT {first['size']}, {first['world_size']} x {first['device']}, "
        f"batch {first['batch_per_rank']} per rank\n"
    )
    print("| run | final train loss | final val loss | median ms/step |")
    print("|---|---|---|---|")
    for name, d in runs.items():
        h = d["history"]
        ms = sorted(h["ms_per_step"])[len(h["ms_per_step"]) // 2]
        print(f"| {name} | {h['train_loss'][-1]:.3f} | {h['val_loss'][-1]:.3f} | {ms:.1f} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, d in runs.items():
            h = d["history"]
            color = "C0" if name.endswith("muon") else "C1"
            if name.startswith("ddp"):
                ax.plot(h["val_step"], h["val_loss"], "-", color=color, label=f"{name} (val)")
            else:  # drawn as markers: the two layouts give the same curve
                ax.plot(h["val_step"], h["val_loss"], "x", color=color, label=f"{name} (val)")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.set_title(f"GPT {first['size']} on {first['world_size']} x {first['device']}: DDP and FSDP2")
        ax.legend()
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"\nwrote {plot}")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", default="benchmarks/results/distributed_h200")
    ap.add_argument("--train", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    scaling_tables(args.prefix)
    if args.train:
        training(args.train, args.plot)


if __name__ == "__main__":
    main()
