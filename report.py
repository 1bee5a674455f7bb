"""Table 1 from finished runs: per-cell mean ± std over seeds, paired significance tests against
cDPO, Markdown + CSV, and the chosen / rejected log-prob curves (the paper's Figure 6).

    python report.py runs=[runs/smollm2_135m-arith] out=reports/embedded
    python report.py runs=[runs/ablations/b] rows=ce.b reference=1.0 out=reports/ablation_b

Results come from every `<method_dir>/eval.json` under `runs`, and from wandb when it is online.
"""
import hydra
from hydra.utils import to_absolute_path
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="report")
def main(cfg: DictConfig) -> None:
    from cdpo.cli import run_entry

    run_entry("report.py", lambda: report(cfg), also=(ValueError,))  # ValueError: bad rows/reference/test


def report(cfg: DictConfig) -> None:
    from cdpo.report import build_report

    runs = [cfg.runs] if isinstance(cfg.runs, str) else list(cfg.runs)
    report = build_report([to_absolute_path(r) for r in runs], to_absolute_path(cfg.out), rows=cfg.rows,
                          reference=str(cfg.reference), test=cfg.test, alpha=cfg.alpha,
                          resamples=cfg.resamples, wandb=cfg.wandb, wandb_path=cfg.wandb_path,
                          smoothing=cfg.smoothing, expect_rows=_names(cfg.expect.rows), expect_seeds=_seeds(cfg.expect.seeds))
    print(report["markdown"])
    print("wrote " + ", ".join(str(f) for f in report["files"]))


def _names(rows) -> list[str] | None:
    """A list, or one string of comma-separated rows (what `${cdpo_grid:NAME}` gives a sweep)."""
    if rows is None or isinstance(rows, str):
        return None if rows is None else [r.strip() for r in rows.split(",") if r.strip()]
    return [str(r) for r in rows]


def _seeds(seeds) -> list[int] | None:
    if seeds is not None and (isinstance(seeds, (str, int, float)) or not all(isinstance(s, int) for s in seeds)):
        raise ValueError(f"expect.seeds={seeds!r}: a list of seeds, e.g. expect.seeds=[0,1,2]")
    return None if seeds is None else list(seeds)


if __name__ == "__main__":
    main()
