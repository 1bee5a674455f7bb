"""Run the cDPO pipeline: `python train.py` (embedded default) or `python train.py +experiment=llama3_8b_cdpo`.

Stages: sample -> select -> sft_pos / sft_neg -> score -> align -> eval; `stage=<name>` runs one.
"""
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from cdpo.errors import USER_ERRORS
    from cdpo.pipeline import run_pipeline

    try:
        run_pipeline(cfg)
    except USER_ERRORS as e:  # bad input or an empty selection: the message says what to do
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
