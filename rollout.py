"""Critical-token analysis on a finished run: `python rollout.py` (embedded default) or with overrides.

    python rollout.py rollout.limit=10 rollout.stride=2 rollout.m=16

For each incorrect trajectory of the score stage's scored pairs: continuations resampled after every
prefix (the success rate per position and the critical token, see cdpo/analysis/rollout.py), pass@k
with vs without the critical token, how often the lowest-p_ce token is the critical token, and an
HTML token viewer. Writes everything under rollout.output_dir (default <run_dir>/analysis).
Sharded and resumable: rerunning continues after the last finished shard.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="rollout")
def main(cfg: DictConfig) -> None:
    from cdpo.cli import run_entry

    def work():
        from cdpo.validation import validate

        validate(cfg, training=False)  # before torch and the model are loaded
        from cdpo.analysis.run import run

        run(cfg)

    run_entry("rollout.py", work)  # RolloutConfigError is a UserError


if __name__ == "__main__":
    main()
