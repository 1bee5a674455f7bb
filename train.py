"""Run the cDPO pipeline: `python train.py` (embedded default) or `python train.py +experiment=llama3_8b_cdpo`."""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from cdpo.pipeline import run_pipeline

    run_pipeline(cfg)


if __name__ == "__main__":
    main()
