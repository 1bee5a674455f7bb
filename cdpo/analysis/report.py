"""Numbers of the critical-token analysis: pass@k with vs without the critical token, and how often
cheaper detectors (contrastive estimation, the policy's own probability, a random token) find the
rollout critical token."""
from __future__ import annotations

from cdpo.pipeline.evaluate import pass_at_k


def with_critical(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("critical_index") is not None]


def pass_at_k_curves(records: list[dict]) -> dict:
    """Mean unbiased pass@k over the trajectories that have a critical token, k = 1..n."""
    rs = [r for r in with_critical(records) if "with" in r]
    if not rs:
        return {"trajectories": 0, "k": [], "with": [], "without": []}
    n = min(r["with"]["n"] for r in rs)
    ks = list(range(1, n + 1))

    def curve(side):
        return [sum(pass_at_k(r[side]["n"], r[side]["correct"], k) for r in rs) / len(rs) for k in ks]

    return {"trajectories": len(rs), "k": ks, "with": curve("with"), "without": curve("without")}


def _argmin(xs: list[float]) -> int:
    return min(range(len(xs)), key=xs.__getitem__)


def _hits(guess: int, truth: int, lines: list[int], windows: list[int]) -> dict:
    out = {"exact": float(guess == truth)}
    out.update({f"within_{w}": float(abs(guess - truth) <= w) for w in windows})
    out["same_line"] = float(lines[guess] == lines[truth])
    out["distance"] = float(abs(guess - truth))
    return out


def _random_hits(truth: int, lines: list[int], windows: list[int]) -> dict:
    """Expected hits of a uniformly random token position (exact, not sampled)."""
    n = len(lines)
    out = {"exact": 1 / n}
    out.update({f"within_{w}": (min(truth + w, n - 1) - max(truth - w, 0) + 1) / n for w in windows})
    out["same_line"] = sum(line == lines[truth] for line in lines) / n
    out["distance"] = sum(abs(t - truth) for t in range(n)) / n
    return out


DETECTORS = {
    "contrastive estimation (lowest p_ce)": lambda r: r["ce_critical_index"],
    "policy (lowest pi(y_t))": lambda r: _argmin(r["policy_logp"]),
}


def agreement(records: list[dict], windows: list[int] = (1, 3)) -> dict:
    """How often each detector's token is the rollout critical token: exactly, within +-w tokens, on
    the same reasoning line; mean distance in tokens. Over the trajectories with a critical token."""
    windows = list(windows)
    rs = with_critical(records)
    columns = ["exact", *[f"within_{w}" for w in windows], "same_line", "distance"]
    rows = {}
    for name, pick in DETECTORS.items():
        hits = [_hits(pick(r), r["critical_index"], r["token_lines"], windows) for r in rs]
        rows[name] = {c: sum(h[c] for h in hits) / len(hits) if hits else None for c in columns}
    hits = [_random_hits(r["critical_index"], r["token_lines"], windows) for r in rs]
    rows["random token (expected)"] = {c: sum(h[c] for h in hits) / len(hits) if hits else None for c in columns}
    return {"trajectories": len(records), "with_critical_token": len(rs),
            "lost_from_the_start": sum(r.get("critical_index") is None for r in records),
            "windows": windows, "columns": columns, "rows": rows}


def agreement_markdown(table: dict) -> str:
    def head(c):
        names = {"exact": "exact", "same_line": "same line", "distance": "mean distance (tokens)"}
        return names[c] if c in names else f"within ±{c.removeprefix('within_')}"

    cols = table["columns"]
    lines = ["| detector | " + " | ".join(head(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in table["rows"].items():
        cells = ["–" if row[c] is None else f"{row[c]:.2f}" if c == "distance" else f"{100 * row[c]:.0f} %"
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\n{table['with_critical_token']} of {table['trajectories']} incorrect trajectories have a rollout "
                 f"critical token ({table['lost_from_the_start']} had no successful continuation from any prefix).")
    return "\n".join(lines)

