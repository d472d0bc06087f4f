"""Variants of Muon's update rule against plain Muon and AdamW on the demo's GPT: does each one help?

Every optimizer trains the same model from the same seeds on the same batches with the demo's recipe (warmup,
cosine decay, each optimizer's weight decay, clipping: ``muonkit.train.recipe``) at its default learning rate.
Per optimizer: final validation loss at equal steps, and at equal wall-clock (the last evaluation within the
shortest run's training time), mean and sample standard deviation over the seeds. Before the timed runs each
optimizer trains ``--warmup-steps`` steps once, unrecorded, so that one-time costs of the process (kernel tuning,
compilation, CUDA graph capture: see docs/performance.md for their size) do not land in the first seed's
wall-clock. Prints a table, writes JSON.

    python benchmarks/variants.py --seeds 3 --out benchmarks/results/variants_lm_small_cpu.json        # 2-core CPU
    python benchmarks/variants.py --size medium --device cuda --data 'corpus/**/*.txt' --out variants_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from muonkit.train import SIZES, LMTask, builtin_corpus, run_comparison, run_key, text_corpus
from muonkit.train.recipe import Recipe
from muonkit.train.report import environment

VARIANTS = ("muon", "adamw", "muon_cwd", "muon_heads", "muon_heads_o", "normuon", "muon_aol", "muon_eq", "muon_cans",
            "muon_mw")  # fmt: skip


def at_wall(result: Any, seconds: float) -> float:
    """Validation loss at the last evaluation within ``seconds`` of training."""
    losses = [loss for wall, loss in zip(result.eval_wall, result.val_loss) if wall <= seconds + 1e-9]
    return losses[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default=",".join(VARIANTS))
    ap.add_argument("--size", default="small")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=None, help="a file, a directory or a glob of text (default: built-in)")
    ap.add_argument("--momentum-warmup", type=int, default=0, help="Muon's momentum from 0.85 over these steps")
    ap.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=LR",
        help="another learning rate for one optimizer (repeatable), e.g. muon_heads_o=0.02",
    )
    ap.add_argument("--warmup-steps", type=int, default=3, help="unrecorded steps per optimizer first (0: none)")
    ap.add_argument("--out", default="variants.json")
    args = ap.parse_args()
    names = args.optimizers.split(",")
    lrs = {}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in names or not value:
            ap.error(f"--lr {item!r}: give NAME=LR for one of --optimizers ({', '.join(names)})")
        lrs[name] = float(value)
    corpus = text_corpus(args.data) if args.data else builtin_corpus()
    task = LMTask(corpus, SIZES[args.size], batch_size=args.batch_size or 16, device=args.device, size=args.size)
    recipe = Recipe(momentum_warmup=args.momentum_warmup)
    if args.warmup_steps:
        run_comparison(task, names, steps=args.warmup_steps, eval_every=args.warmup_steps, seed=args.seeds,
                       lrs=lrs or None, recipe=recipe, progress=False)  # fmt: skip
    results, _ = run_comparison(
        task, names, steps=args.steps, eval_every=max(1, args.steps // 30), seeds=args.seeds, recipe=recipe,
        lrs=lrs or None, progress=False,
    )  # fmt: skip
    seeds = range(args.seeds)
    wall = min(r.eval_wall[-1] for r in results.values())
    rows = []
    for name in names:
        runs = [results[run_key(name, s, args.seeds)] for s in seeds]
        steps = [r.val_loss[-1] for r in runs]
        timed = [at_wall(r, wall) for r in runs]
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append({
            "optimizer": name, "lr": runs[0].lr,
            "val_loss_at_steps": statistics.fmean(steps), "val_loss_at_steps_sd": spread(steps),
            "val_loss_at_wall": statistics.fmean(timed), "val_loss_at_wall_sd": spread(timed),
            "per_seed_at_steps": steps, "per_seed_at_wall": timed,
            "seconds": statistics.fmean(r.train_seconds for r in runs),
        })  # fmt: skip
    print(f"{args.seeds} seeds, {args.steps} steps, equal wall-clock = {wall:.1f} s of training")
    print(f"{'optimizer':<12} {'lr':>8} {'val @ steps':>17} {'val @ wall-clock':>17} {'train s':>8}")
    for r in rows:
        print(f"{r['optimizer']:<12} {r['lr']:>8.3g} {r['val_loss_at_steps']:>9.4f} ± {r['val_loss_at_steps_sd']:.4f}"
              f" {r['val_loss_at_wall']:>9.4f} ± {r['val_loss_at_wall_sd']:.4f} {r['seconds']:>8.1f}")  # fmt: skip
    meta = {"command": " ".join(["python", *sys.argv]), "size": args.size, "steps": args.steps,
            "seeds": args.seeds, "batch_size": task.batch_size,
            "data": args.data, "tokens": corpus.n_tokens, "equal_wall_seconds": wall, "recipe": recipe.to_dict(),
            "warmup_steps": args.warmup_steps,
            **environment(args.device)}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
