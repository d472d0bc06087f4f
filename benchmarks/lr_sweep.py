"""Learning-rate sweep behind the demo's defaults (``muonkit.train.optimizers.DEFAULT_LR``).

For each optimizer, trains the demo model (same seed, batches and steps) at a few learning rates and
reports the final validation loss (``--seeds N``: its mean over N initialisations). Muon runs use
``--adamw-part-lr`` for their AdamW groups (default: the best AdamW lr of the same sweep). Every run takes the
demo's training recipe (warmup, cosine decay, each optimizer's weight decay, clipping: ``muonkit.train.recipe``;
``--recipe none`` for constant learning rates without weight decay or clipping). A best value on the edge of its
grid is flagged: widen the grid (``--grid``) until it is inside. Prints a table and writes JSON.

    python benchmarks/lr_sweep.py --task lm --steps 300 --out benchmarks/results/lr_sweep_lm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from muonkit.train import SIZES, DigitsTask, LMTask, builtin_corpus, text_corpus, train_one
from muonkit.train import loop as loop_mod
from muonkit.train.recipe import Recipe
from muonkit.train.report import environment

GRID = {
    "adamw": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
    "muon": [0.005, 0.01, 0.02, 0.04, 0.08],
    "torch_muon": [0.005, 0.01, 0.02, 0.04, 0.08],
    "sgd": [0.03, 0.1, 0.3, 1.0],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="lm", choices=["lm", "digits"])
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optimizers", default="adamw,muon,sgd")
    ap.add_argument(
        "--adamw-part-lr", type=float, default=None, help="AdamW lr inside Muon runs (default: best swept AdamW lr)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recipe", default="default", choices=["default", "none"])
    ap.add_argument("--data", default=None, help="LM text: a file, a directory or a glob (default: built-in)")
    ap.add_argument("--out", default="lr_sweep.json")
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=LR1,LR2", help="replace a grid")
    ap.add_argument("--seeds", type=int, default=1, help="runs per lr (initialisations 0..N-1), losses averaged")
    args = ap.parse_args()
    for item in args.grid:
        name, _, values = item.partition("=")
        GRID[name] = [float(v) for v in values.split(",")]
    if args.task == "lm":
        corpus = text_corpus(args.data) if args.data else builtin_corpus()
        task = LMTask(corpus, SIZES[args.size], batch_size=args.batch_size or 16, device=args.device, size=args.size)
    else:
        task = DigitsTask(batch_size=args.batch_size or 64, device=args.device)
    recipe = Recipe() if args.recipe == "default" else None
    rows: list[dict] = []
    part_lr = args.adamw_part_lr
    for name in args.optimizers.split(","):
        if name.startswith("muon") and part_lr is None and any(r["optimizer"] == "adamw" for r in rows):
            part_lr = min((r for r in rows if r["optimizer"] == "adamw"), key=lambda r: r["final_val_loss"])["lr"]
        for lr in GRID[name]:
            t0 = time.perf_counter()
            lrs = {name: lr} if part_lr is None or name == "adamw" else {name: lr, "adamw": part_lr}
            runs = [
                train_one(task, name, steps=args.steps, eval_every=args.steps, lrs=lrs, recipe=recipe, seed=seed)
                for seed in range(args.seeds)
            ]
            losses = [r.val_loss[-1] for r in runs]
            row = {"optimizer": name, "lr": lr, "final_val_loss": sum(losses) / len(losses),
                   "seconds": (time.perf_counter() - t0) / len(runs)}  # fmt: skip
            if args.seeds > 1:
                row["per_seed_val_loss"] = losses
            if all("val_acc" in r.metrics for r in runs):
                row["final_val_acc"] = sum(r.metrics["val_acc"][-1] for r in runs) / len(runs)
            rows.append(row)
            print(f"{name:<8} lr={lr:<8g} val_loss={row['final_val_loss']:.4f}  ({row['seconds']:.0f}s)", flush=True)
            save(args, task, recipe, part_lr, rows)
    best, edges = save(args, task, recipe, part_lr, rows)
    print("\nbest lr:", {k: v["lr"] for k, v in best.items()})
    if edges:
        print(f"on the edge of their grid (widen it): {edges}")


def save(args: argparse.Namespace, task: Any, recipe: Recipe | None, part_lr: float | None,
         rows: list[dict]) -> tuple[dict[str, dict], dict[str, float]]:  # fmt: skip
    """Write the JSON of the runs so far (after every run, so that a sweep cut short keeps what it measured);
    returns the best run per optimizer and the best values on their grid's edge."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["optimizer"] not in best or row["final_val_loss"] < best[row["optimizer"]]["final_val_loss"]:
            best[row["optimizer"]] = row
    edges = {k: v["lr"] for k, v in best.items() if v["lr"] in (min(GRID[k]), max(GRID[k]))}
    meta = {
        "task": args.task,
        "size": args.size if args.task == "lm" else None,
        "steps": args.steps,
        "seeds": args.seeds,
        "batch_size": task.batch_size,
        "adamw_part_lr": part_lr or loop_mod.resolve_lrs(task.lr_key)["adamw"],
        "data": args.data,
        "tokens": task.corpus.n_tokens if args.task == "lm" else None,
        "recipe": recipe.to_dict() if recipe else None,
        "best_on_grid_edge": edges,
        **environment(args.device),
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "runs": rows, "best": {k: v["lr"] for k, v in best.items()}}, f, indent=2)
    return best, edges


if __name__ == "__main__":
    main()
