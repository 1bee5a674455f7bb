"""Where each stage's artifact lives, how a finished stage is recognised, and resumable shards.

A stage is finished when its marker `<stage>.done.json` exists: it is written last, after the
artifact itself, and holds the stage's summary. The resolved config is saved beside it.
Sharded stages (sample, score) write one atomic file per shard, so an interrupted run redoes at
most the shard it was in and never duplicates or loses records.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

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

    @property
    def history(self) -> Path:
        """Metrics logged during align, one JSON line per logging step (read by the report)."""
        return self.method / "metrics.jsonl"

    def artifacts(self, stage: str) -> list[Path]:
        """What a shared stage writes (what `reuse_stage` carries over to another run_dir)."""
        return {"sample": [self.trajectories], "select": [self.positives, self.negatives, self.pairs],
                "sft_pos": [self.pos_adapter], "sft_neg": [self.neg_adapter], "score": [self.scored_pairs]}[stage]


# Config sections each stage depends on; a stage also depends on everything its inputs depended on.
STAGE_INPUTS = {
    "sample": ("model", "data", "sample", "generation"),
    "select": ("select",),
    "sft_pos": ("ce", "ce_lora"),
    "sft_neg": ("ce", "ce_lora"),
    "score": ("ce",),
    "align": ("method", "peft", "align", "seed", "loss_impl"),
}
# Settings inside those sections that a stage does not use: changing them must not redo it (the CE
# models do not depend on the contrastive strength b, so an ablation over b reuses them).
STAGE_IGNORES = {
    "sft_pos": ("ce.b", "ce.shard_size", "ce.share_prefix"),
    "sft_neg": ("ce.b", "ce.shard_size", "ce.share_prefix"),
}
_ORDER = ("sample", "select", "sft_pos", "sft_neg", "score", "align")


def changed_settings(paths: RunPaths, stage: str, cfg: DictConfig) -> list[str]:
    """Settings that differ between the finished stage's saved config and `cfg` (dotted keys)."""
    saved_path = paths.marker(stage).parent / f"{stage}.config.yaml"
    if not saved_path.exists() or stage not in STAGE_INPUTS:
        return []
    saved = _signature_of(OmegaConf.to_container(OmegaConf.load(saved_path)), stage)
    now = stage_signature(cfg, stage)
    return sorted(d for k in now for d in _diff(saved.get(k), now[k], k))


def _diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _diff(a.get(k), b.get(k), f"{prefix}.{k}")]
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def stage_signature(cfg: DictConfig, stage: str) -> dict:
    """The resolved settings `stage` depends on (its own and its inputs')."""
    return _signature_of(OmegaConf.to_container(cfg, resolve=True), stage)


def _signature_of(config: dict, stage: str) -> dict:
    keys = sorted({k for s in _ORDER[:_ORDER.index(stage) + 1] for k in STAGE_INPUTS[s]})
    signature = {k: config.get(k) for k in keys}
    for dotted in STAGE_IGNORES.get(stage, ()):
        section, key = dotted.split(".")
        if isinstance(signature.get(section), dict):
            signature[section] = {k: v for k, v in signature[section].items() if k != key}
    return signature


# What each stage's artifact feeds (eval always reruns and checks its cached results itself).
DOWNSTREAM = {
    "sample": ("select", "sft_pos", "sft_neg", "score", "align"),
    "select": ("sft_pos", "sft_neg", "score", "align"),
    "sft_pos": ("score", "align"),
    "sft_neg": ("score", "align"),
    "score": ("align",),
    "align": (),
}


def invalidate_after(paths: RunPaths, stage: str) -> list[str]:
    """Remove the markers of the stages that consume `stage`'s artifact, which has just been redone.
    (The aligned adapters of other methods in the same run_dir keep theirs: the runner warns when
    their inputs' settings changed.)"""
    removed = []
    for later in DOWNSTREAM[stage]:
        marker = paths.marker(later)
        if marker.exists():
            marker.unlink()
            removed.append(later)
    return removed


def is_done(paths: RunPaths, stage: str) -> bool:
    return paths.marker(stage).exists()


def reuse_stage(source: RunPaths, paths: RunPaths, stage: str, cfg: DictConfig) -> bool:
    """Carry a finished shared stage over from another run_dir when it was made with the settings `cfg`
    asks for. Files are hard-linked (every artifact is replaced by rename, never rewritten in place,
    so the two run_dirs cannot alter each other's copy), directories, markers and configs copied."""
    if stage not in STAGE_INPUTS or stage == "align" or source.run.resolve() == paths.run.resolve():
        return False
    if not is_done(source, stage) or changed_settings(source, stage, cfg):
        return False
    for src in source.artifacts(stage):
        dst = paths.run / src.relative_to(source.run)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)
    for name in (f"{stage}.config.yaml", f"{stage}.done.json"):  # the marker last: the stage is done
        shutil.copy2(source.run / name, paths.run / name)
    return True


def mark_done(paths: RunPaths, stage: str, cfg: DictConfig, summary: dict) -> None:
    marker = paths.marker(stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    (marker.parent / f"{stage}.config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_json(marker, summary)


def _shards(items: Sequence, shard_size: int, shard_dir: Path):
    for index, start in enumerate(range(0, len(items), shard_size)):
        yield shard_dir / f"shard-{index:05d}.jsonl", items[start:start + shard_size]


def _finished_shard(path: Path, shard: Sequence, key: Callable[[Any], str]) -> list[dict] | None:
    """The records of a shard file that holds exactly these items, else None."""
    if path.exists():
        done = read_jsonl(path)
        if [r.get("key") for r in done] == [key(item) for item in shard]:
            return done
    return None


def _signature_matches(shard_dir: Path, signature: dict) -> bool:
    sig_path = shard_dir / "signature.json"
    return sig_path.exists() and json.loads(sig_path.read_text()) == signature


def pending_items(items: Sequence, shard_size: int, shard_dir: Path, *, key: Callable[[Any], str],
                  signature: dict) -> list:
    """The items `run_sharded` with these arguments would still process (for cost estimates)."""
    if not _signature_matches(shard_dir, signature):
        return list(items)
    return [item for path, shard in _shards(items, shard_size, shard_dir)
            if _finished_shard(path, shard, key) is None for item in shard]


def run_sharded(items: Sequence, shard_size: int, shard_dir: Path, work: Callable[[Sequence], list[dict]],
                out_path: Path, *, key: Callable[[Any], str], signature: dict,
                on_skip: Callable[[int], None] | None = None) -> list[dict]:
    """Apply `work` to consecutive shards of `items`, each written to its own file, and write the
    concatenation to `out_path`. A shard file left by an interrupted run is reused only when it was
    made with the same `signature` (the settings the stage depends on) and holds the same items
    (by `key`, which must equal each output record's "key" field); otherwise the shards are redone."""
    if shard_dir.exists() and not _signature_matches(shard_dir, signature):
        shutil.rmtree(shard_dir)  # made with other settings: stale
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(shard_dir / "signature.json", signature)
    records: list[dict] = []
    for path, shard in _shards(items, shard_size, shard_dir):
        done = _finished_shard(path, shard, key)
        if done is not None:
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
