"""Stage identities are pinned: a refactor must not change what a finished stage's identity hashes, or every
finished run_dir (a running Table 1 grid) would be redone. The identities of every stage of every Table 1 row
of a fixed tiny run, on fixed artifact contents, are recorded here as computed by the code of 2026-12-03
(before the objectives/stages refactor); a change to them is a change to every run_dir's identities."""
from pathlib import Path

import pytest
from test_pipeline import _cfg

from cdpo.pipeline.artifacts import RunPaths, stage_identity

ROWS = ("baseline", "sft", "dpo", "tokendpo", "rpo", "simpo", "ipo", "cdpo", "cdpo_per_position")
# the presets a grid runs under: the defaults, the embedded Table 1 grid's and the paper's (its cDPO loss form)
# (The embedded grid's seeds became whole replicates, sample.seed = ce.seed = seed, after these were pinned:
# a change of the preset's settings, not of how identities are computed; pinned at its seed-0 samples.)
PRESETS = {"default": (), "embedded": ("+sweep=embedded", "sample.seed=0", "ce.seed=0"),
           "paper": ("+experiment=paper", "model=tiny", "+paper_temperature.tiny.gsm8k=0.5")}
SHARED = ("sample", "select", "sft_pos", "sft_neg", "score")

# preset -> stage -> identity hash, shared by every row (run-level stages)
PINNED_SHARED = {'default': {'sample': '44daefee8337caa9',
                              'select': '0a168b0f827f6462',
                              'sft_pos': 'b493ed7523a33921',
                              'sft_neg': '3acb0cd2414a81d6',
                              'score': '84560822a2694e59'},
                  'embedded': {'sample': '303cb6b326610caa',
                               'select': '445130eaf2d57127',
                               'sft_pos': 'ff7df5f74aead455',
                               'sft_neg': 'd2c5ba2d878f0d79',
                               'score': 'da3be01ecc578bae'}}
# preset -> row -> (align hash, eval hash): method-level stages (the paper preset's questions are GSM8K's: not loaded)
PINNED_ROWS = {'default': {'baseline': ('6752df63213495b1', '2a16fb3ea7f041ee'),
                            'sft': ('6ccf34542b87baa7', '32c23c3122a0f6e1'),
                            'dpo': ('9ef7c25f95c4df78', '32c23c3122a0f6e1'),
                            'tokendpo': ('c71dbd687ccd066e', '32c23c3122a0f6e1'),
                            'rpo': ('cd6f030d8f50d1fc', '32c23c3122a0f6e1'),
                            'simpo': ('e1f3008cbf0a5a4a', '32c23c3122a0f6e1'),
                            'ipo': ('9eb971fa5b09de9b', '32c23c3122a0f6e1'),
                            'cdpo': ('f8e73e5070a77e61', '32c23c3122a0f6e1'),
                            'cdpo_per_position': ('9b734763ad3f0177', '32c23c3122a0f6e1')},
                'embedded': {'baseline': ('e7e0cfc623ac620b', '2a16fb3ea7f041ee'),
                             'sft': ('fe782c2e128c279d', '32c23c3122a0f6e1'),
                             'dpo': ('f13b0f2fe97c4e96', '32c23c3122a0f6e1'),
                             'tokendpo': ('67d1ca84b809acd1', '32c23c3122a0f6e1'),
                             'rpo': ('5b3c1bb863bc1fb5', '32c23c3122a0f6e1'),
                             'simpo': ('0d1b547dcb9443c9', '32c23c3122a0f6e1'),
                             'ipo': ('09d1be917c9738f2', '32c23c3122a0f6e1'),
                             'cdpo': ('7e299015f860c1d1', '32c23c3122a0f6e1'),
                             'cdpo_per_position': ('5ce142012056508d', '32c23c3122a0f6e1')},
                'paper': {'baseline': ('a2f8efb26248512e', '2a16fb3ea7f041ee'),
                          'sft': ('40af5f9f6db6eb5a', '32c23c3122a0f6e1'),
                          'dpo': ('0bfa02ff91180fac', '32c23c3122a0f6e1'),
                          'tokendpo': ('71ad620c896ba8d2', '32c23c3122a0f6e1'),
                          'rpo': ('17113da0513f5d2e', '32c23c3122a0f6e1'),
                          'simpo': ('f5df3e5fff548b40', '32c23c3122a0f6e1'),
                          'ipo': ('4d0c7a7d0caddada', '32c23c3122a0f6e1'),
                          'cdpo': ('7aa8f2e605a5ce41', '32c23c3122a0f6e1'),
                          'cdpo_per_position': ('6a809eec3b8bcf7f', '32c23c3122a0f6e1')}}


def _fixed_artifacts(paths: RunPaths) -> None:
    """Every artifact a stage reads, with fixed contents (no marker: their digests come from the files)."""
    for i, f in enumerate((paths.trajectories, paths.positives, paths.negatives, paths.pairs, paths.scored_pairs)):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f'{{"key": "fixed-{i}"}}\n')
    for i, d in enumerate((paths.pos_adapter, paths.neg_adapter, paths.aligned_adapter)):
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_model.safetensors").write_bytes(bytes([i]) * 64)
        (d / "adapter_config.json").write_text('{"r": 8, "target_modules": ["v_proj", "q_proj"]}')


def _identities(tmp_path: Path, preset: str, row: str) -> dict[str, str]:
    cfg = _cfg(tmp_path / "run", *PRESETS[preset], f"method={row}", "seed=1")
    assert cfg.model.name == "tiny"
    paths = RunPaths(cfg)
    _fixed_artifacts(paths)
    stages = (*SHARED, "align", "eval") if preset != "paper" else ("align", "eval")  # paper: GSM8K questions
    return {stage: stage_identity(cfg, paths, stage)["hash"] for stage in stages}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("row", ROWS)
def test_stage_identities_of_a_fixed_tiny_run_are_pinned(tmp_path, preset, row):
    got = _identities(tmp_path, preset, row)
    if preset != "paper":
        assert {s: got[s] for s in SHARED} == PINNED_SHARED[preset]
    assert (got["align"], got["eval"]) == PINNED_ROWS[preset][row]
