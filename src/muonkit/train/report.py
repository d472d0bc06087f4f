"""Turn a comparison's results into a table, ``results.json`` and PNG plots."""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from .loop import RunResult, steps_to_reach

__all__ = ["comparison", "format_table", "load_results", "plot_results", "result_line", "write_results"]


def _by_seed(results: dict[str, RunResult], name: str) -> dict[str, RunResult]:
    """``name``'s runs by seed label (``""`` for a single-seed comparison's one run; see ``loop.run_key``)."""
    if name in results:
        return {"": results[name]}
    prefix = name + "/"
    return {k[len(prefix) :]: r for k, r in results.items() if k.startswith(prefix)}


def _pair(ref: RunResult, sub: RunResult) -> dict[str, Any]:
    target = ref.val_loss[-1]
    step, wall = steps_to_reach(sub, target)
    ref_steps, ref_wall = ref.eval_steps[-1], ref.eval_wall[-1]
    return {
        "target_val_loss": target,
        "reference_steps": ref_steps,
        "reference_seconds": ref_wall,
        "subject_steps_to_target": step,
        "subject_seconds_to_target": wall,
        "step_ratio": step / ref_steps if step is not None and ref_steps else None,
        "time_ratio": wall / ref_wall if wall is not None and ref_wall else None,
        "subject_final_val_loss": sub.val_loss[-1] if sub.val_loss else None,
        "subject_final_step": sub.eval_steps[-1] if sub.eval_steps else None,
    }


def comparison(results: dict[str, RunResult], against: str = "adamw", subject: str = "muon") -> dict[str, Any]:
    """When ``subject`` first reaches ``against``'s final validation loss, in steps and wall-clock, and both final
    validation losses (at equal steps). With several seeds each seed's runs are paired, and the means, standard
    deviations (``*_std``) and ranges (``*_range``) over the seeds are given, with ``per_seed``."""
    refs, subs = _by_seed(results, against), _by_seed(results, subject)
    pairs = [_pair(refs[k], subs[k]) for k in refs if k in subs and refs[k].val_loss and subs[k].val_loss]
    if not pairs:
        return {}
    head = {"reference": against, "subject": subject, "seeds": len(pairs)}
    if len(pairs) == 1:
        return {**head, **pairs[0]}
    reached = [p for p in pairs if p["subject_steps_to_target"] is not None]
    out: dict[str, Any] = {**head, "per_seed": pairs, "reached": len(reached)}
    out["reference_steps"] = pairs[0]["reference_steps"]
    out["subject_final_step"] = pairs[0]["subject_final_step"]
    for key in ("target_val_loss", "subject_final_val_loss"):
        values = [p[key] for p in pairs]
        out[key], out[key + "_std"] = statistics.fmean(values), statistics.stdev(values)
    for key in ("step_ratio", "time_ratio"):
        values = [p[key] for p in reached if p[key] is not None]
        out[key] = statistics.fmean(values) if values else None
        out[key + "_range"] = [min(values), max(values)] if values else None
    out["subject_steps_to_target"] = (
        statistics.fmean(p["subject_steps_to_target"] for p in reached) if reached else None
    )
    return out


def result_line(comp: dict[str, Any]) -> str:
    """The comparison in one honest sentence: both final validation losses at equal steps, then steps and
    wall-clock to the reference's final validation loss (or that it was not reached), with the seed count (means,
    standard deviations and ranges over the seeds where there are several)."""
    subject, ref = comp["subject"].replace("muon", "Muon"), comp["reference"].replace("adamw", "AdamW")
    seeds = comp.get("seeds", 1)
    many = seeds > 1
    loss = lambda key: f"{comp[key]:.3f}" + (f" ± {comp[key + '_std']:.3f}" if many else "")
    text = f"{subject} vs {ref} ({seeds} seed{'s, mean ± sd' if many else ''}): validation loss after "
    text += f"{comp['reference_steps']} steps {loss('subject_final_val_loss')} vs {loss('target_val_loss')}"
    if comp["subject_final_step"] != comp["reference_steps"]:
        text += f" (the {subject} run ended at step {comp['subject_final_step']})"
    reached = comp.get("reached", 0 if comp["subject_steps_to_target"] is None else 1)
    if reached == 0:
        return text + f"; {subject} did not reach {ref}'s final validation loss{' in any seed' if many else ''}."
    ratio = lambda key, what: (
        f"{comp[key]:.2f}x {what}" + (f" ({comp[key + '_range'][0]:.2f}-{comp[key + '_range'][1]:.2f})" if many else "")
    )
    wall = f" and {ratio('time_ratio', 'the wall-clock')}" if comp["time_ratio"] is not None else ""
    where = f" in {reached} of {seeds} seeds," if many else ""
    return (
        text + f"; {subject} reached {ref}'s final validation loss{where} in {ratio('step_ratio', 'the steps')}{wall}."
    )


def _reference(results: dict[str, RunResult], key: str) -> RunResult | None:
    """The AdamW run a run is compared with: the one of the same seed (``loop.run_key``), if it has evaluations."""
    _, slash, seed = key.partition("/")
    ref = results.get("adamw" + slash + seed)
    return ref if ref is not None and ref.val_loss else None


def format_table(results: dict[str, RunResult], unit: str = "tok") -> str:
    has_acc = any("val_acc" in r.metrics for r in results.values())
    cols = ["optimizer", "lr", "steps", "train loss", "val loss"]
    cols += ["val acc"] if has_acc else []
    cols += ["to AdamW val (steps, x)", "to AdamW val (s, x)", "wall s", f"{unit}/s", "opt %"]
    rows = []
    for name, r in results.items():
        tail = r.train_loss[-10:]
        row = [name, f"{r.lr:.3g}", str(r.eval_steps[-1] if r.eval_steps else 0)]
        row += [f"{sum(tail) / len(tail):.3f}" if tail else "-", f"{r.val_loss[-1]:.3f}" if r.val_loss else "-"]
        if has_acc:
            row.append(f"{100 * r.metrics['val_acc'][-1]:.1f}%" if "val_acc" in r.metrics else "-")
        reach_steps = reach_time = "-"
        ref = _reference(results, name)
        if ref is not None and ref is not r:
            step, wall = steps_to_reach(r, ref.val_loss[-1])
            if step is None or wall is None:
                reach_steps = reach_time = "not reached"
            else:
                reach_steps = f"{step} ({step / ref.eval_steps[-1]:.2f}x)"
                reach_time = f"{wall:.1f} ({wall / ref.eval_wall[-1]:.2f}x)" if ref.eval_wall[-1] else f"{wall:.1f}"
        share = 100 * r.optimizer_seconds / r.train_seconds if r.train_seconds else 0.0
        row += [reach_steps, reach_time, f"{r.train_seconds:.1f}", f"{r.items_per_s:,.0f}", f"{share:.1f}"]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(cols), "-" * len(line(cols)), *(line(r) for r in rows)])


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware a measurement was taken on (recorded in every results JSON)."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_results(
    out_dir: Path, results: dict[str, RunResult], config: dict[str, Any], interrupted: bool = False
) -> Path:
    path = out_dir / "results.json"
    payload = {
        "config": config,
        "environment": environment(config.get("device", "cpu")),
        "interrupted": interrupted,
        "comparison": comparison(results),
        "runs": {name: r.to_dict() for name, r in results.items()},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def load_results(out_dir: Path) -> tuple[dict[str, Any], dict[str, RunResult]]:
    data = json.loads((out_dir / "results.json").read_text())
    return data["config"], {name: RunResult.from_dict(r) for name, r in data["runs"].items()}


def plot_results(out_dir: Path, results: dict[str, RunResult], title: str) -> list[Path]:
    """PNG plots of validation metrics vs step and vs wall-clock; [] if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    panels = [("val_loss", "step", "validation loss vs step"), ("val_loss", "wall", "validation loss vs wall-clock")]
    if any("val_acc" in r.metrics for r in results.values()):
        panels.append(("val_acc", "step", "validation accuracy vs step"))
    for metric, xaxis, label in panels:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for name, r in results.items():
            if metric not in r.metrics:
                continue
            xs = r.eval_steps if xaxis == "step" else r.eval_wall
            ax.plot(xs, r.metrics[metric], label=name, marker="." if len(xs) < 40 else None)
        ax.set_xlabel("step" if xaxis == "step" else "training wall-clock (s)")
        ax.set_ylabel(metric.replace("_", " "))
        if metric == "val_loss":
            lows = [min(r.val_loss) for r in results.values() if r.val_loss]
            firsts = [r.val_loss[min(1, len(r.val_loss) - 1)] for r in results.values() if r.val_loss]
            if lows:
                ax.set_ylim(min(lows) - 0.05, max(firsts) + 0.1)
        ax.set_title(f"{title}: {label}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_{'step' if xaxis == 'step' else 'time'}.png"
        tmp = path.with_name(path.stem + ".tmp.png")  # whole or not at all: a stopped run leaves the old plot
        fig.savefig(tmp)
        tmp.replace(path)
        plt.close(fig)
        paths.append(path)
    return paths
