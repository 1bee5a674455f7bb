"""Run the cDPO pipeline: `python train.py` (embedded default) or `python train.py +experiment=llama3_8b_cdpo`.

Stages: sample -> select -> sft_pos / sft_neg -> score -> align -> eval; `stage=<name>` runs one.
Sweeps: `python train.py -m method=dpo,cdpo seed=0,1,2` or a preset, `python train.py -m +sweep=embedded`.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from cdpo.cli import run_entry
    from cdpo.validation import validate

    def work():
        validate(cfg)  # every setting checked in a second, before torch and the model are loaded
        from cdpo.pipeline import run_pipeline

        run_pipeline(cfg)

    run_entry("train.py", work)


if __name__ == "__main__":
    from cdpo.cli import check_launcher

    check_launcher("train.py")  # -m hydra/launcher=slurm without its plugin: one line, not Hydra's traceback
    main()
