"""The pipeline's stages (sample -> select -> sft_pos / sft_neg -> score -> align -> eval) and runner."""
from cdpo.pipeline.runner import STAGES, run_pipeline

__all__ = ["STAGES", "run_pipeline"]
