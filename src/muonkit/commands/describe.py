"""``muonkit describe``: which parameters of a model Muon takes, which AdamW takes, and why."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

__all__ = ["add_parser", "load_model"]


class DescribeError(ValueError):
    """The model could not be built from what was given on the command line."""


def load_model(spec: str) -> Any:
    """A model from ``gpt:SIZE`` (the demo's GPT) or ``package.module:callable`` (called with no arguments)."""
    from torch import nn

    if spec.startswith("gpt:"):
        from ..train import GPT, SIZES

        size = spec.split(":", 1)[1]
        if size not in SIZES:
            raise DescribeError(f"unknown GPT size {size!r}; choose from {', '.join(SIZES)}")
        return GPT(SIZES[size])
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DescribeError(f"expected gpt:SIZE or package.module:callable, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DescribeError(f"cannot import {module_name!r}: {err}") from None
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise DescribeError(f"{module_name!r} has no attribute {attr!r}") from None
    if callable(factory) and not isinstance(factory, nn.Module):
        try:
            model = factory()
        except TypeError as err:
            raise DescribeError(f"calling {spec}() with no arguments failed: {err}") from None
    else:
        model = factory
    if not isinstance(model, nn.Module):
        raise DescribeError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _split(items: list[str]) -> dict[str, Any]:
    """``--split`` items as ``param_groups``' split mapping: ``PATTERN=K`` or ``PATTERN=R1,R2,...`` cut rows,
    ``PATTERN=cols:K`` (or ``cols:C1,C2,...``) columns; the same pattern given for rows and columns cuts both."""
    axes: dict[str, dict[str, Any]] = {}
    for item in items:
        pattern, sep, value = item.partition("=")
        if not sep:
            raise DescribeError(f"--split takes PATTERN=K, PATTERN=R1,R2,... or PATTERN=cols:K, got {item!r}")
        axis, _, counts = value.rpartition(":")
        if axis not in ("", "rows", "cols"):
            raise DescribeError(f"--split {item!r}: the axis before ':' must be 'rows' or 'cols'")
        try:
            parts = [int(v) for v in counts.split(",")]
        except ValueError:
            raise DescribeError(f"--split {item!r}: the part counts must be integers") from None
        axes.setdefault(pattern, {})[axis or "rows"] = parts[0] if len(parts) == 1 else parts
    return {pattern: split if "cols" in split else split["rows"] for pattern, split in axes.items()}


def _run(args: argparse.Namespace) -> int:
    from ..optim import classify, describe

    model = load_model(args.model)
    split = _split(args.split)
    kwargs = {"adamw": args.adamw, "muon": args.muon, "split": split}
    if args.json:
        plans = classify(model, **kwargs)
        print(
            json.dumps(
                [
                    {"name": p.name, "shape": list(p.param.shape), "algorithm": p.algorithm, "why": p.reason}
                    for p in plans
                ],
                indent=1,
            )
        )
    else:
        print(describe(model, **kwargs))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "describe",
        help="show which parameters of a model go to Muon and which to AdamW, and why",
        description="Build a model and print muonkit.param_groups' decision for every parameter. MODEL is "
        "gpt:SIZE (the demo's GPT: tiny, small, medium, large) or package.module:callable (called with "
        "no arguments; an nn.Module attribute is used as it is).",
    )
    p.add_argument("model", metavar="MODEL")
    p.add_argument(
        "--split",
        action="append",
        default=[],
        metavar="PATTERN=K",
        help="matrices to orthogonalize in parts: rows, e.g. '*.qkv.weight=3', or columns, e.g. "
        "'*.attn.proj.weight=cols:4' (repeatable)",
    )
    p.add_argument("--adamw", action="append", default=[], metavar="PATTERN", help="force these to AdamW")
    p.add_argument("--muon", action="append", default=[], metavar="PATTERN", help="force these to Muon")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run)
