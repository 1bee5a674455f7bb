"""PNG figures of the critical-token analysis (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_pass_at_k(curves: dict, path: Path, title: str = "") -> Path:
    """pass@k of continuations with vs without the critical token (the paper's Figure 1)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(curves["k"], [100 * v for v in curves["without"]], marker="o", ms=3, color="#15803d",
            label="critical token replaced (sampled, original excluded)")
    ax.plot(curves["k"], [100 * v for v in curves["with"]], marker="o", ms=3, color="#b91c1c",
            label="with the critical token")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"{curves['trajectories']} incorrect trajectories", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_success_rates(records: list[dict], path: Path, title: str = "") -> Path:
    """Rollout success rate s_t against the distance from the critical token, one line per trajectory."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for r in records:
        if r.get("critical_index") is None:
            continue
        c, m = r["critical_index"], r["m"]
        ax.plot([t - c for t in r["positions"]], [100 * k / m for k in r["correct"]], marker=".", ms=4, alpha=0.6)
    ax.axvline(0, color="#b91c1c", lw=1, ls="--")
    ax.set_xlabel("token position − critical token position")
    ax.set_ylabel("correct continuations (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title or "rollout success rate around the critical token", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
