"""``muonkit demo`` and ``muonkit train``: Muon against AdamW (and others) on the same model, batches and recipe,
with run directories that never lie or lose results (``--out``, ``--resume``, ``--overwrite``)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from ._args import UsageError, number

__all__ = ["add_parsers"]

DEFAULT_STEPS = {"lm": 300, "digits": 300}
QUICK: dict[str, dict[str, Any]] = {
    "lm": {"size": "tiny", "steps": 40, "eval_every": 5},
    "digits": {"steps": 60, "eval_every": 5},
}


_POSITIVE = number(1, integer=True)  # --steps 0 used to fall back to the default silently


def _check_device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: only cpu and cuda devices are supported")
    return text


def _parse_optimizers(text: str) -> list[str]:
    from ..train import OPTIMIZERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise UsageError(f"unknown optimizer(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(OPTIMIZERS)}")
    if "torch_muon" in names:
        import torch

        if not hasattr(torch.optim, "Muon"):
            raise UsageError(f"torch_muon needs torch.optim.Muon (torch >= 2.9); this torch is {torch.__version__}")
    return list(dict.fromkeys(names))


def _parse_named(items: list[str], flag: str, what: str, zero_ok: bool = False) -> dict[str, float]:
    """``NAME=VALUE`` items of a repeated flag (``--lr``, ``--weight-decay``): finite values > 0 (>= 0 with
    ``zero_ok``) for known optimizer names."""
    from ..train import OPTIMIZERS

    values = {}
    for item in items:
        name, _, text = item.partition("=")
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{flag} expects NAME=VALUE, e.g. {flag} muon=0.03; got {item!r}") from None
        if not (math.isfinite(value) and (value >= 0 if zero_ok else value > 0)):
            raise UsageError(f"{flag} {item}: {what} must be a finite number {'>=' if zero_ok else '>'} 0")
        values[name.strip()] = value
    unknown = sorted(set(values) - set(OPTIMIZERS))
    if unknown:
        raise UsageError(f"{flag}: given for unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    return values


def _parse_lrs(items: list[str]) -> dict[str, float]:
    return _parse_named(items, "--lr", "a learning rate")


# flags that set the training recipe, each named as the ``train.recipe.Recipe`` field it sets
_RECIPE_FLAGS = ("schedule", "warmup", "weight_decay", "clip", "momentum_warmup")


def _recipe_value(flag: str, given: Any) -> Any:
    if flag == "weight_decay":
        return _parse_named(given, "--weight-decay", "a weight decay", zero_ok=True)
    if flag == "clip":
        return given or None  # --clip 0: no clipping
    return given


def _recipe_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from ..train.recipe import Recipe

    given = {
        flag: _recipe_value(flag, getattr(args, flag))
        for flag in _RECIPE_FLAGS
        if getattr(args, flag) not in (None, [])
    }
    return Recipe(**given).to_dict()


def _steps_for_tokens(args: argparse.Namespace, task: str, size: str) -> int | None:
    """``--tokens N`` as a number of steps: the fewest that train on at least N tokens (batch x context each)."""
    if args.tokens is None:
        return None
    if task != "lm":
        raise UsageError("--tokens applies to the language-model task only")
    if args.steps is not None:
        raise UsageError("give --steps or --tokens, not both")
    from ..train import SIZES

    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    return max(1, math.ceil(args.tokens / ((args.batch_size or 16) * SIZES[size].ctx)))


def _config_from_args(args: argparse.Namespace, task: str) -> dict[str, Any]:
    optimizers = _parse_optimizers(args.optimizers or "muon,adamw")
    for name in ("muon_heads", "muon_heads_o"):
        if task == "digits" and name in optimizers:
            raise UsageError(f"{name} orthogonalizes attention heads: the language-model task only")
    quick = QUICK[task] if args.quick else {}
    size = quick.get("size", args.size or "small")
    steps = _steps_for_tokens(args, task, size) or args.steps or quick.get("steps") or DEFAULT_STEPS[task]
    return {
        "command": args.command,
        "task": task,
        "data": str(Path(args.data).resolve()) if getattr(args, "data", None) else None,
        "size": size,
        "steps": steps,
        "eval_every": args.eval_every or quick.get("eval_every") or max(1, steps // 30),
        "batch_size": args.batch_size,
        "optimizers": optimizers,
        "lrs": _parse_lrs(args.lr),
        "recipe": _recipe_from_args(args),
        "seed": 0 if args.seed is None else args.seed,
        "seeds": args.seeds or 1,
        "sweep": bool(args.sweep),
        "device": _check_device(args.device or "cpu"),
    }


def _build_task(config: dict[str, Any]) -> Any:
    from ..train import SIZES, CorpusError, DigitsTask, LMTask, builtin_corpus, text_corpus

    device = config["device"]
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available in this torch build")
    if config["task"] == "digits":
        return DigitsTask(batch_size=config["batch_size"] or 64, seed=config["seed"], device=device)
    if config["size"] not in SIZES:
        raise UsageError(f"unknown size {config['size']!r}; choose from {', '.join(SIZES)}")
    cfg = SIZES[config["size"]]
    try:
        corpus = text_corpus(config["data"]) if config["data"] else builtin_corpus()
        return LMTask(
            corpus, cfg, batch_size=config["batch_size"] or 16, seed=config["seed"], device=device, size=config["size"]
        )
    except (CorpusError, ValueError) as err:  # CorpusError is a ValueError; kept explicit for readers
        raise UsageError(str(err)) from None


def _seeds(config: dict[str, Any]) -> str:
    first, n = config["seed"], config.get("seeds", 1)
    return f"seed {first}" if n == 1 else f"seeds {first}-{first + n - 1}"


def _describe(config: dict[str, Any], task: Any) -> str:
    if config["task"] == "digits":
        return (
            f"CNN on scikit-learn's 8x8 digits ({len(task.y_train)} train / {len(task.y_val)} validation images); "
            f"{config['steps']} steps per optimizer, batch {task.batch_size}, {_seeds(config)}"
        )
    cfg = task.cfg
    files = len(task.corpus.sources)
    where = config["data"] or f"{files} standard-library modules"
    where += f" ({files} files)" if config["data"] and files > 1 else ""
    return (
        f"byte-level GPT ({cfg.n_layer} layers, width {cfg.d_model}, context {cfg.ctx}) on {where} "
        f"({task.corpus.n_tokens:,} bytes); {config['steps']} steps per optimizer, batch {task.batch_size}, "
        f"{_seeds(config)}, device {config['device']}"
    )


def _repeats_warning(config: dict[str, Any], task: Any) -> str | None:
    """A warning when a language-model run trains on more tokens than its training text holds: it then sees the
    text several times and its validation loss can turn up (memorisation), which a comparison should not read as
    an optimizer's doing."""
    if config["task"] != "lm":
        return None
    trained = config["steps"] * task.batch_size * task.cfg.ctx
    held = task.corpus.train.numel()
    if trained <= held:
        return None
    return (
        f"warning: each optimizer trains on {trained:,} tokens, {trained / held:.1f}x the {held:,} bytes of training "
        "text: it will see the text more than once and may memorise it (validation loss turning up). Give more "
        "text with --data DIR or a glob, or fewer steps (--steps, --tokens)."
    )


def _sweep(config: dict[str, Any], task: Any, recipe: Any, progress: bool) -> dict[str, Any]:
    """``--sweep``: the learning rates the sweep chose (``train.sweep``) put into the config, with its results."""
    from ..train.sweep import FACTORS, on_edge, sweep_lrs

    names = list(config["optimizers"])
    print(f"sweeping learning rates: each optimizer at {', '.join(f'{f:g}x' for f in FACTORS)} its lr, "
          f"{config['steps']} steps, seed {config['seed']} (more where the best is on an edge)")  # fmt: skip
    report = (
        (lambda n, lr, loss: print(f"  {n:<10} lr {lr:<9.3g} val loss {loss:.4f}", flush=True)) if progress else None
    )
    chosen, table = sweep_lrs(
        task, names, steps=config["steps"], seed=config["seed"], lrs=config["lrs"], recipe=recipe, on_run=report
    )
    edges = [n for n, rows in table.items() if on_edge(rows)]
    print("chosen: " + ", ".join(f"{n} {lr:.3g}" for n, lr in chosen.items()))
    if edges:
        print(f"warning: the best lr of {', '.join(edges)} is still on the edge of what was tried")
    return {**config, "lrs": {**config["lrs"], **chosen}, "sweep_results": table}


def _compare(config: dict[str, Any], out_dir: Path, previous: dict | None, progress: bool, task: Any = None) -> int:
    from ..train import run_comparison
    from ..train.recipe import Recipe
    from ..train.report import comparison, format_table, plot_results, result_line, write_results

    task = task if task is not None else _build_task(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a run saved without a recipe (older results.json) kept its learning rates constant: it continues so
    recipe = Recipe.from_dict(config["recipe"]) if config.get("recipe") is not None else None
    recipe_line = recipe.describe(config["steps"], config["optimizers"]) if recipe else "lr: constant; no weight decay"
    print(f"muonkit {config['command']}: {_describe(config, task)}\n{recipe_line}")
    warning = _repeats_warning(config, task)
    if warning:
        print(warning)
    if config.get("sweep") and "sweep_results" not in config:  # a resumed run keeps the lrs its sweep chose
        config = _sweep(config, task, recipe, progress)
    config = {**config, "task_details": task.describe()}
    write_results(out_dir, previous or {}, config, interrupted=True)  # so that --resume works from the start
    results, interrupted = run_comparison(
        task,
        config["optimizers"],
        steps=config["steps"],
        eval_every=config["eval_every"],
        seed=config["seed"],
        lrs=config["lrs"],
        out_dir=out_dir,
        previous=previous,
        progress=progress,
        recipe=recipe,
        seeds=config.get("seeds", 1),
    )
    if not results:
        print("interrupted before any evaluation; nothing to report")
        return 130
    json_path = write_results(out_dir, results, config, interrupted)
    plots = plot_results(out_dir, results, "digits CNN" if config["task"] == "digits" else f"GPT {config['size']}")
    unit = "img" if config["task"] == "digits" else "tok"
    print(f"\n{recipe_line}\n" + format_table(results, unit))
    comp = comparison(results)
    if comp:
        print("\n" + result_line(comp))
    print(f"\nresults: {json_path}")
    for p in plots:
        print(f"plot:    {p}")
    if not plots:
        print("(no plots: install matplotlib, e.g. pip install 'muonkit[plot]')")
    if interrupted:
        print(f"interrupted: kept what was gathered; continue with  muonkit {config['command']} --resume {out_dir}")
        return 130
    return 0


# flags a resumed run takes from its saved config: given with --resume, they must agree with it
_RUN_FLAGS = {"optimizers": "optimizers", "steps": "steps", "size": "size", "batch_size": "batch_size",
              "eval_every": "eval_every", "lr": "lrs", "seed": "seed", "seeds": "seeds", "device": "device",
              "data": "data", "task": "task", "quick": None, "tokens": None, "sweep": "sweep"}  # fmt: skip


def _run_files(out_dir: Path) -> list[Path]:
    """What in ``out_dir`` belongs to a run: results.json, checkpoints, plots."""
    if not out_dir.is_dir():
        return []
    return sorted(
        p
        for p in out_dir.iterdir()
        if p.name == "results.json" or p.name.startswith("checkpoint-") or p.suffix == ".png"
    )


def _resume_conflicts(args: argparse.Namespace, config: dict[str, Any]) -> list[str]:
    """The flags given beside ``--resume`` that differ from the saved run's config."""
    conflicts = []
    recipe = config.get("recipe") or {}
    for flag in _RECIPE_FLAGS:
        given = getattr(args, flag, None)
        if given in (None, []):
            continue
        value = _recipe_value(flag, given)
        if value != recipe.get(flag, "(not set)"):
            saved = recipe.get(flag, "(a run without a recipe)")
            conflicts.append(f"--{flag.replace('_', '-')} {value!r} (the run has {saved!r})")
    for flag, key in _RUN_FLAGS.items():
        given = getattr(args, flag, None)
        if given in (None, [], False):
            continue
        if key is None:
            conflicts.append(f"--{flag.replace('_', '-')}")
            continue
        saved = config.get(key)
        if flag == "optimizers":
            given = _parse_optimizers(given)
        elif flag == "lr":
            given = _parse_lrs(given)
        elif flag == "data":
            given = str(Path(given).resolve())
        if given != saved:
            conflicts.append(f"--{flag.replace('_', '-')} {given!r} (the run has {saved!r})")
    return conflicts


def _run(args: argparse.Namespace) -> int:
    from ..train.report import load_results

    if args.resume:
        out_dir = Path(args.resume)
        if not (out_dir / "results.json").is_file():
            raise UsageError(f"--resume {out_dir}: no results.json there (not a muonkit run directory)")
        try:
            config, previous = load_results(out_dir)
        except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            raise UsageError(f"--resume {out_dir}: {out_dir / 'results.json'} cannot be read ({err})") from None
        if config["command"] != args.command:
            raise UsageError(f"--resume {out_dir}: that run was made by 'muonkit {config['command']}'")
        conflicts = _resume_conflicts(args, config)
        if conflicts:
            raise UsageError(
                f"--resume {out_dir} continues the run as it was started; these flags contradict it: "
                + "; ".join(conflicts)
                + ". Start a new run in another directory to change them."
            )
        config.pop("task_details", None)
        return _compare(config, out_dir, previous, not args.no_progress)
    if args.command == "train" and not args.data:
        raise UsageError("train needs --data PATH (a UTF-8 text file, a directory or a glob) or --resume DIR")
    config = _config_from_args(args, getattr(args, "task", "lm") or "lm")
    out_dir = Path(args.out) if args.out else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir}: exists and is not a directory")
    existing = _run_files(out_dir)
    if existing and not args.overwrite:
        raise UsageError(
            f"--out {out_dir} holds another run ({', '.join(p.name for p in existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}); continue it with --resume {out_dir}, replace it with "
            "--overwrite, or choose another directory"
        )
    task = _build_task(config)  # a run that cannot start fails here, before anything in out_dir is touched
    for p in existing:
        p.unlink()
    return _compare(config, out_dir, None, not args.no_progress, task)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--optimizers",
        default=None,
        help="comma-separated: muon,adamw (default),sgd,muon_svd,torch_muon,muon_cwd,muon_heads,muon_heads_o,normuon,"
        "muon_aol,muon_eq,muon_cans,muon_mw",
    )
    p.add_argument("--steps", type=_POSITIVE, default=None, help="training steps per optimizer (default 300)")
    p.add_argument("--tokens", type=_POSITIVE, default=None, metavar="N",
                   help="train each optimizer on N tokens (sets the steps: batch size x context each)")  # fmt: skip
    p.add_argument("--size", default=None, help="GPT size: tiny, small (default), medium, large")
    p.add_argument("--batch-size", type=_POSITIVE, default=None)
    p.add_argument("--eval-every", type=_POSITIVE, default=None)
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR", help="override a peak learning rate")
    p.add_argument("--schedule", default=None, choices=["cosine", "wsd", "constant"],
                   help="lr schedule after the warmup: cosine to 0.1x (default), wsd (warmup-stable-decay), "
                   "constant")  # fmt: skip
    p.add_argument("--warmup", type=number(0, integer=True), default=None, metavar="STEPS",
                   help="linear warmup steps (default 5%% of --steps)")  # fmt: skip
    p.add_argument("--weight-decay", action="append", default=[], metavar="NAME=WD",
                   help="decoupled weight decay (defaults: muon 0.01, adamw 0.1 on matrices, sgd 0)")  # fmt: skip
    p.add_argument("--clip", type=number(0), default=None, metavar="NORM",
                   help="clip the gradient norm (default 1.0; 0: no clipping)")  # fmt: skip
    p.add_argument("--momentum-warmup", type=number(0, integer=True), default=None, metavar="STEPS",
                   help="raise Muon's momentum from 0.85 to its own over STEPS steps (default 0: off)")  # fmt: skip
    p.add_argument("--seed", type=int, default=None, help="the first seed (default 0)")
    p.add_argument("--seeds", type=_POSITIVE, default=None, metavar="N",
                   help="run every optimizer with N seeds (model initialisation and batch order) and report "
                   "means and spreads (default 1)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>/)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue an interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--sweep", action="store_true",
                   help="first sweep each optimizer's lr on this task (0.5x, 1x, 2x, widened past an edge) and "
                   "compare at the best")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few seconds: tiny model, few steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def add_parsers(sub: Any) -> None:
    """The ``demo`` and ``train`` subcommands."""
    demo = sub.add_parser("demo", help="Muon vs AdamW on built-in data (standard-library text or 8x8 digits)")
    demo.add_argument("--task", default=None, choices=["lm", "digits"], help="default lm")
    _common(demo)
    train = sub.add_parser("train", help="Muon vs AdamW on your own UTF-8 text (a file, a directory or a glob)")
    train.add_argument("--data", default=None, metavar="PATH",
                       help="a UTF-8 text file, a directory of them, or a glob such as 'books/**/*.txt'")  # fmt: skip
    _common(train)
