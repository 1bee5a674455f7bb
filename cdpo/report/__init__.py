"""Table 1 from finished runs: Markdown and CSV tables with paired significance tests, and the
training-curve plot (Figure 6). `python report.py runs=[runs/...]`; `build_report(...)` in code."""
from __future__ import annotations

from pathlib import Path

from cdpo.report.collect import Result, collect_local, collect_wandb, merge, wandb_online
from cdpo.report.cost import cost_markdown, stage_markers
from cdpo.report.plots import SMOOTHING, mean_curves, plot_logps
from cdpo.report.table import DATA_NAMES, MODEL_NAMES, Table

__all__ = ["Result", "Table", "build_report", "collect_local", "collect_wandb", "merge"]


def build_report(runs: list[str], out: str | Path, *, rows: str = "method.name", reference: str = "cdpo",
                 test: str = "bootstrap", alpha: float = 0.005, resamples: int = 10_000, wandb: str | bool = "auto",
                 wandb_path: str = "cdpo", smoothing: float = SMOOTHING, expect_rows: list[str] | None = None,
                 expect_seeds: list[int] | None = None, api=None) -> dict:
    """Collect, tabulate, test, plot; write <out>.md, <out>.csv and <out>-<model>-<data>-logps.png
    (`smoothing`: the curves' EMA weight, 0 for the raw points only; `expect_rows` / `expect_seeds`: the
    grid the report should cover, whose missing rows and seeds it names)."""
    results = collect_local(runs, rows) if runs else []
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0 <= smoothing < 1:
        raise ValueError(f"smoothing={smoothing!r}: the EMA weight of the past, a number in [0, 1) (0: no smoothing)")
    if wandb not in ("auto", True, False):
        raise ValueError(f"wandb={wandb!r}: choose auto, true or false")
    use_wandb = wandb is True or (wandb == "auto" and (api is not None or wandb_online()))
    if use_wandb:
        if api is None:
            import wandb as wandb_lib

            api = wandb_lib.Api()
        results = merge(results, collect_wandb(api, wandb_path, rows))
    table = Table(results, rows_key=rows, reference=reference, test=test, alpha=alpha, resamples=resamples,
                  expect_rows=expect_rows, expect_seeds=expect_seeds)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = []
    for model, data in table.columns:
        curves = {table.label(row): mean_curves(table.by_cell.get(((model, data), row), [])) for row in table.rows}
        title = f"{MODEL_NAMES.get(model, model)} on {DATA_NAMES.get(data, data)}: chosen (solid), rejected (dashed)"
        fig = plot_logps(curves, title, out.parent / f"{out.name}-{model}-{data}-logps.png", smoothing)
        if fig:
            figures.append(fig)
    sources = sorted({"wandb" if r.source.startswith("wandb:") else "run directories" for r in results})
    md = "\n".join([
        table.markdown(), f"{len(results)} runs, read from {' and '.join(sources)}.", "",
        f"Each row against {table.label(reference, short=True)} on the questions both answered: Δ in "
        f"accuracy points with a 95 % paired-bootstrap interval ({resamples} resamples of the questions; with "
        f"several seeds a question scores the fraction of seeds that solved it; the interval holds the sample sets "
        f"fixed, so the spread of each seed's own Δ is shown beside it), and McNemar's exact test per "
        f"seed (matched by seed number), of which the largest p is shown. Both rows are taken on the sample sets "
        f"they share (`seeds`: a replicate's samples and CE models); rows that share none are compared across "
        f"sample sets, said so, and never starred. The last column applies a rule fixed before the embedded grid's "
        f"rows were in: {table.label(reference, short=True)}'s advantage *holds* when its Δ is positive in every "
        f"seed with McNemar's p < {alpha:g} in each and the 95 % interval excludes 0, is *reversed* when the same "
        f"holds the other way, and is otherwise *unresolved* (*pending* while either row lacks a seed):", "",
        table.significance_markdown(),
        *(f"![{f.stem}: chosen (solid) and rejected (dashed) log-probs during training]({f.name})\n"
          for f in figures), cost_markdown(stage_markers(runs))])
    md_path, csv_path = out.parent / f"{out.name}.md", out.parent / f"{out.name}.csv"
    md_path.write_text(md)
    csv_path.write_text(table.csv())
    return {"markdown": md, "table": table, "figures": figures, "results": results,
            "files": [md_path, csv_path, *figures]}
