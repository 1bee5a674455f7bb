"""The results the repository ships are what report.py makes of the results it ships: the second edition's
report (docs/results/embedded-grid.md / .csv) is rebuilt from its archive (docs/results/embedded-grid/), so a
table that was not regenerated after new results were archived fails here."""
from pathlib import Path

from cdpo.objectives import grid
from cdpo.report import build_report

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_the_shipped_grid_report_is_rebuilt_from_the_shipped_results(tmp_path):
    rebuilt = build_report([RESULTS / "embedded-grid"], tmp_path / "embedded-grid", wandb=False,
                           expect_rows=grid("embedded"))
    regenerate = ("python report.py runs=[docs/results/embedded-grid] out=docs/results/embedded-grid "
                  "'expect.rows=${cdpo_grid:embedded}'")
    assert (RESULTS / "embedded-grid.md").read_text() == rebuilt["markdown"], f"stale: run {regenerate}"
    assert (RESULTS / "embedded-grid.csv").read_text() == (tmp_path / "embedded-grid.csv").read_text(), regenerate
