"""The results the repository ships are what report.py makes of the results it ships: the second edition's
reports (docs/results/embedded-grid.md / .csv against cDPO, and embedded-grid-per_position.md / .csv against
the per-position form once shipped) are rebuilt from its archive (docs/results/embedded-grid/), so a table
that was not regenerated after new results were archived fails here."""
from pathlib import Path

import pytest

from cdpo.objectives import grid
from cdpo.report import build_report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.mark.parametrize("reference,name", [("cdpo", "embedded-grid"), ("cdpo_per_position", "embedded-grid-per_position")])
def test_the_shipped_grid_report_is_rebuilt_from_the_shipped_results(tmp_path, reference, name):
    if reference != "cdpo" and not (RESULTS / f"{name}.md").exists():
        pytest.skip(f"docs/results/{name}.md: not shipped yet (it is once the grid has that row)")
    rebuilt = build_report([RESULTS / "embedded-grid"], tmp_path / name, reference=reference, wandb=False,
                           expect_rows=grid("embedded"))
    regenerate = (f"python report.py runs=[docs/results/embedded-grid] out=docs/results/{name} reference={reference} "
                  "'expect.rows=${cdpo_grid:embedded}'")
    assert (RESULTS / f"{name}.md").read_text() == rebuilt["markdown"], f"stale: run {regenerate}"
    assert (RESULTS / f"{name}.csv").read_text() == (tmp_path / f"{name}.csv").read_text(), regenerate
