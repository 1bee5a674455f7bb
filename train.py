"""Run the cDPO pipeline: `python train.py` (embedded default) or `python train.py +experiment=llama3_8b_cdpo`.

Stages: sample -> select -> sft_pos / sft_neg -> score -> align -> eval; `stage=<name>` runs one.
Sweeps: `python train.py -m method=dpo,cdpo seed=0,1,2` or a preset, `python train.py -m +sweep=embedded`.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from cdpo.errors import USER_ERRORS
    from cdpo.pipeline import run_pipeline

    try:
        run_pipeline(cfg)
    except USER_ERRORS as e:  # bad input or an empty selection: the message says what to do
        print(f"train.py: error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job, runs the others and raises at the end of the sweep
        sys.exit(2)


if __name__ == "__main__":
    main()
