"""LightningModules and DataModules of the pipeline."""
from cdpo.modules.datamodules import PairsDataModule, SequencesDataModule
from cdpo.modules.preference import PreferenceModule
from cdpo.modules.scoring import ContrastiveScorer
from cdpo.modules.sft import SFTModule

__all__ = ["SFTModule", "PreferenceModule", "ContrastiveScorer", "SequencesDataModule", "PairsDataModule"]
