"""The table of stages (cdpo/stages.py) is what the artifacts code reads: each declared input is an
earlier stage's declared output, and the paths the run uses are the table's."""
from omegaconf import OmegaConf

from cdpo.objectives import METHODS, build
from cdpo.pipeline.artifacts import RunPaths, input_files
from cdpo.stages import ALIGN_INPUT, NAMES, STAGES


def test_every_input_is_an_earlier_stages_output():
    for i, stage in enumerate(STAGES):
        for spec in stage.inputs:
            if spec == ALIGN_INPUT:
                continue
            up, name = spec.split(".")
            assert up in NAMES[:i], f"{stage.name} reads {spec} from a stage that does not run before it"
            assert name in STAGES[NAMES.index(up)].outputs, f"{stage.name} reads {spec}, which {up} does not write"


def test_paths_follow_the_table(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "run"), "method_dir": str(tmp_path / "run" / "m"),
                            "data": {"name": "arith"}})
    paths = RunPaths(cfg)
    for stage in STAGES:
        assert paths.artifacts(stage.name) == [getattr(paths, o) for o in stage.outputs]
    assert input_files(cfg, paths, "score") == [("select", paths.pairs), ("sft_pos", paths.pos_adapter),
                                                ("sft_neg", paths.neg_adapter)]
    for name in METHODS:  # align reads what its objective trains on; eval the adapter when there is one
        objective = build(name)
        align = input_files(cfg, paths, "align", objective)
        evaluate = input_files(cfg, paths, "eval", objective)
        assert (align != []) == objective.trains and (evaluate == [("align", paths.aligned_adapter)]) == objective.trains
