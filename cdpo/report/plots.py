"""The paper's Figure 6: log-probabilities of the chosen (solid) and rejected (dashed) responses
during preference training, one colour per method, averaged over seeds at each step, with an
exponential moving average over the raw points (drawn faint)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean

from cdpo.analysis.figures import pyplot
from cdpo.report.collect import CURVES, Result

SMOOTHING = 0.8  # the EMA's weight of the past (report.yaml `smoothing`)


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


def ema(values: list[float], weight: float) -> list[float]:
    """Exponential moving average over the logged points: s_0 = v_0, s_t = weight s_(t-1) + (1 - weight) v_t."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else weight * out[-1] + (1 - weight) * v)
    return out


def draw_logps(curves: dict[str, dict], title: str, smoothing: float = SMOOTHING):
    """The figure (or None): per row, the logged means drawn faint and their EMA (`smoothing`: the weight of
    the past, 0 = none) drawn full; per-batch values jump with the batch's sequences, the EMA shows the trend.
    Rows without both curves (SFT, baseline) are left out."""
    curves = {label: c for label, c in curves.items() if all(m in c for m in CURVES)}
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, c) in enumerate(curves.items()):
        for metric, style, side in (("logps/chosen", "-", "chosen"), ("logps/rejected", "--", "rejected")):
            steps, values = c[metric]
            if smoothing:
                ax.plot(steps, values, color=f"C{i}", linestyle=style, alpha=0.25, linewidth=0.8)
                values = ema(values, smoothing)
            ax.plot(steps, values, color=f"C{i}", linestyle=style, label=f"{label} {side}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("training step" + (f" (faint: as logged; lines: EMA, weight {smoothing:g})" if smoothing else ""))
    ax.set_ylabel("sequence log-probability")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    return fig


def plot_logps(curves: dict[str, dict], title: str, path: Path, smoothing: float = SMOOTHING) -> Path | None:
    """curves: row label -> mean_curves(...); writes draw_logps' figure to `path`."""
    fig = draw_logps(curves, title, smoothing)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
