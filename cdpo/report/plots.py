"""The paper's Figure 6: log-probabilities of the chosen (solid) and rejected (dashed) responses
during preference training, one colour per method, averaged over seeds at each step."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from cdpo.analysis.figures import pyplot
from cdpo.report.collect import CURVES, Result


def mean_curves(results: list[Result]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, mean over seeds and over the rows logged at that step)."""
    out = {}
    for metric in CURVES:
        by_step = defaultdict(list)
        for r in results:
            for row in r.history:
                if metric in row and row.get("step") is not None:
                    by_step[int(row["step"])].append(float(row[metric]))
        if by_step:
            steps = sorted(by_step)
            out[metric] = (steps, [mean(by_step[s]) for s in steps])
    return out


def plot_logps(curves: dict[str, dict], title: str, path: Path) -> Path | None:
    """curves: row label -> mean_curves(...). Rows without both curves (SFT, baseline) are left out."""
    curves = {label: c for label, c in curves.items() if all(m in c for m in CURVES)}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, c) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(*c["logps/chosen"], color=color, linestyle="-", label=f"{label} chosen")
        ax.plot(*c["logps/rejected"], color=color, linestyle="--", label=f"{label} rejected")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("training step")
    ax.set_ylabel("sequence log-probability")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
