"""Where each stage's artifact lives, how a finished stage is recognised, and resumable shards.

A stage is finished when its marker `<stage>.done.json` exists: it is written last, after the
artifact itself, and holds the stage's summary. The resolved config is saved beside it.
Sharded stages (sample, score) write one atomic file per shard, so an interrupted run redoes at
most the shard it was in and never duplicates or loses records.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from cdpo.io import iter_jsonl, read_jsonl, write_json, write_jsonl


class RunPaths:
    def __init__(self, cfg: DictConfig):
        self.run = Path(cfg.run_dir)
        self.method = Path(cfg.method_dir)

    # shared by every method and seed
    trajectories = property(lambda s: s.run / "trajectories.jsonl")
    positives = property(lambda s: s.run / "positives.jsonl")
    negatives = property(lambda s: s.run / "negatives.jsonl")
    pairs = property(lambda s: s.run / "pairs.jsonl")
    scored_pairs = property(lambda s: s.run / "scored_pairs.jsonl")
    ref_logps = property(lambda s: s.run / "ref_logps.jsonl")
    pos_adapter = property(lambda s: s.run / "adapters" / "pos")
    neg_adapter = property(lambda s: s.run / "adapters" / "neg")

    def shards(self, stage: str) -> Path:
        return self.run / "shards" / stage

    def eval_file(self, model_name: str) -> Path:
        """Predictions of `model_name`; base and sft are shared, the aligned model is per method."""
        if model_name in ("base", "sft"):
            return self.run / "eval" / f"{model_name}.jsonl"
        return self.method / "eval.jsonl"

    def marker(self, stage: str) -> Path:
        return (self.method if stage in ("align", "eval") else self.run) / f"{stage}.done.json"

    @property
    def aligned_adapter(self) -> Path:
        return self.method / "adapter"


def is_done(paths: RunPaths, stage: str) -> bool:
    return paths.marker(stage).exists()


def mark_done(paths: RunPaths, stage: str, cfg: DictConfig, summary: dict) -> None:
    marker = paths.marker(stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    (marker.parent / f"{stage}.config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(marker, summary)


def run_sharded(items: Sequence, shard_size: int, shard_dir: Path, work: Callable[[Sequence], list[dict]],
                out_path: Path, on_skip: Callable[[int], None] | None = None) -> list[dict]:
    """Apply `work` to consecutive shards of `items`, each written to its own file; shards already on
    disk (from an interrupted run) are reused. Writes the concatenation to `out_path` and returns it."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for index, start in enumerate(range(0, len(items), shard_size)):
        shard = items[start:start + shard_size]
        path = shard_dir / f"shard-{index:05d}.jsonl"
        if path.exists():
            done = read_jsonl(path)
            if len(done) == len(shard):
                records.extend(done)
                if on_skip:
                    on_skip(len(shard))
                continue
        done = work(shard)
        write_jsonl(path, done)
        records.extend(done)
    write_jsonl(out_path, records)
    return records


def load(path: Path) -> list[dict]:
    return [r for _, r in iter_jsonl(path)]


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
