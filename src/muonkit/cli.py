"""The ``muonkit`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .train import OPTIMIZERS, SIZES, builtin_corpus, steps_to_reach, train_lm

    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        print(f"muonkit demo: unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
        return 2
    steps = 40 if args.quick else args.steps
    cfg = SIZES["tiny" if args.quick else args.size]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = builtin_corpus()
    print(
        f"muonkit demo: byte-level GPT ({cfg.n_layer} layers, width {cfg.d_model}, context {cfg.ctx}) on "
        f"{corpus.n_tokens:,} bytes of standard-library source; {steps} steps per optimizer, seed {args.seed}"
    )
    results = {}
    for name in names:
        print(f"  training with {name} ...", flush=True)
        results[name] = train_lm(
            name, cfg, corpus, steps=steps, eval_every=max(1, steps // 10), seed=args.seed, device=args.device
        )
    target = results["adamw"].val_loss[-1] if "adamw" in results else None
    header = (
        f"{'optimizer':<10} {'lr':>7} {'final train':>11} {'final val':>9} {'reach AdamW':>11} "
        f"{'wall s':>7} {'tok/s':>8} {'opt %':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in results.items():
        reach = "-"
        if target is not None:
            step, _ = steps_to_reach(r, target)
            reach = f"{step}" if step is not None else "never"
        train_tail = sum(r.train_loss[-10:]) / len(r.train_loss[-10:])
        print(
            f"{name:<10} {r.lr:>7.4g} {train_tail:>11.3f} {r.val_loss[-1]:>9.3f} {reach:>11} "
            f"{r.train_seconds:>7.1f} {r.tokens_per_s:>8.0f} {100 * r.optimizer_seconds / r.train_seconds:>6.1f}"
        )
    if target is not None and "muon" in results:
        step, _ = steps_to_reach(results["muon"], target)
        if step is not None:
            print(
                f"\nMuon reached AdamW's final validation loss ({target:.3f}) at step {step} of {steps} "
                f"({step / steps:.2f}x the steps)."
            )
        else:
            print(f"\nMuon did not reach AdamW's final validation loss ({target:.3f}) in {steps} steps.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="muonkit", description="The Muon optimizer and its tools.")
    parser.add_argument("--version", action="version", version=f"muonkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small GPT with Muon and AdamW on built-in text and compare")
    demo.add_argument("--size", default="small", choices=["tiny", "small", "medium", "large"])
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--optimizers", default="muon,adamw", help="comma-separated: muon,adamw,sgd,muon_svd")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--quick", action="store_true", help="a few seconds: tiny model, 40 steps")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
