"""Bar charts of optimizer step times from benchmarks/step.py JSON (one chart, one panel per matrix set).

python benchmarks/plot_step.py benchmarks/results/step_1b_h100.json docs/img/step_h100.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json")
    ap.add_argument("png")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.json).read_text())
    sets = list(dict.fromkeys(r["set"] for r in data["rows"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(max(8.0, 5.5 * len(sets)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        rows = [r for r in data["rows"] if r["set"] == name]
        labels = [r["impl"].replace("muonkit+compile", "compile") for r in rows]
        ms = [r["ms"] for r in rows]
        colors = ["C0" if r["impl"].startswith("muonkit") else "C7" for r in rows]
        ax.barh(labels, ms, color=colors)
        for y, v in enumerate(ms):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per optimizer step")
        ax.set_title(f"{name} ({rows[0]['params'] / 1e6:.0f}M matrix params)", fontsize=10)
        ax.set_xlim(0, max(ms) * 1.2)
    env = data["environment"]
    fig.suptitle(f"{env.get('gpu', env.get('cpu'))}, torch {env['torch']}")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
