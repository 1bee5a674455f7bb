"""Keep an artifact edited on purpose as its stage's result:

    python -m cdpo.pipeline.accept <run_dir> <stage> [<method_dir>]

records the artifact as it is now in the stage's marker; later stages then see a new input and are
redone (see artifacts.accept).
"""
import sys

from omegaconf import OmegaConf

from cdpo.errors import UserError
from cdpo.pipeline.artifacts import RunPaths, accept

if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m cdpo.pipeline.accept <run_dir> <stage> [<method_dir>]")
    run_dir, stage = sys.argv[1], sys.argv[2]
    method_dir = sys.argv[3] if len(sys.argv) == 4 else run_dir
    try:
        accept(RunPaths(OmegaConf.create({"run_dir": run_dir, "method_dir": method_dir})), stage)
    except (UserError, KeyError) as e:
        sys.exit(f"accept: error: {e}")
    print(f"{stage}: its marker now describes the artifacts as they are; later stages will be redone")
