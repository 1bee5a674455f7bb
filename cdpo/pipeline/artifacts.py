"""Where each stage's artifact lives, how a finished stage is recognised, and resumable shards.

A stage is finished when its marker `<stage>.done.json` exists: it is written last, after the
artifact itself, and holds the stage's summary, its identity (a hash of its settings and of its
inputs' contents, see identity.py) and the size, record count and sha256 of each artifact it wrote.
The resolved config is saved beside it. A finished stage is reused only when its identity matches
this run's and its artifacts still match the marker.
Sharded stages (sample, score) write one atomic file per shard, so an interrupted run redoes at
most the shard it was in and never duplicates or loses records; shards are tied to the stage's
identity, so shards of other inputs are never reused.

`python -m cdpo.pipeline.accept <run_dir> <stage>` records an artifact edited on purpose
as the stage's result (later stages then see a new input and are redone).
"""
from __future__ import annotations

import logging
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from cdpo import signals
from cdpo.data.preferences import IMPORT_SETTINGS, hub_fingerprint, is_preference_data
from cdpo.errors import CorruptArtifactError, SettingsConflictError, StaleInputError
from cdpo.io import DataError, _atomic_write_text, iter_jsonl, read_jsonl, write_json, write_jsonl
from cdpo.objectives import Objective, TrainsOn, from_config as objective_of
from cdpo.pipeline import identity as ident
from cdpo.stages import ALIGN_INPUT, BY_NAME, STAGES

log = logging.getLogger(__name__)


class RunPaths:
    def __init__(self, cfg: DictConfig):
        self.run = Path(cfg.run_dir)
        self.method = Path(cfg.method_dir)
        self.preference = is_preference_data(cfg.get("data"))  # select imports the user's rows

    # shared by every method and seed
    trajectories = property(lambda s: s.run / "trajectories.jsonl")
    positives = property(lambda s: s.run / "positives.jsonl")
    negatives = property(lambda s: s.run / "negatives.jsonl")
    pairs = property(lambda s: s.run / "pairs.jsonl")
    bad_rows = property(lambda s: s.run / "bad_rows.jsonl")  # preference rows left out, and why
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
        return (self.method if BY_NAME[stage].level == "method" else self.run) / f"{stage}.done.json"

    @property
    def aligned_adapter(self) -> Path:
        return self.method / "adapter"

    @property
    def history(self) -> Path:
        """Metrics logged during align, one JSON line per logging step (read by the report)."""
        return self.method / "metrics.jsonl"

    @property
    def lock(self) -> Path:
        return self.run / ".lock"

    def artifacts(self, stage: str) -> list[Path]:
        """What a stage writes (what its marker describes and `reuse_stage` carries over): the table's outputs,
        and with preference data select's list of the rows it left out."""
        paths = [getattr(self, name) for name in BY_NAME[stage].outputs]
        return paths + [self.bad_rows] if stage == "select" and self.preference else paths

    def optional(self, path: Path) -> bool:
        """An artifact written only when there is something in it (an empty JSONL file is no dataset)."""
        return path == self.bad_rows

    def name(self, path: Path) -> str:
        """A path as its marker names it: relative to the marker's folder."""
        for base in (self.method, self.run):
            try:
                return Path(path).relative_to(base).as_posix()
            except ValueError:
                continue
        return str(path)


# Config sections each stage depends on (the table of stages); a stage also depends on everything its inputs
# depended on.
STAGE_INPUTS = {s.name: s.settings for s in STAGES if s.settings is not None}
# Settings inside those sections that a stage does not use: changing them must not redo it (the CE
# models do not depend on the contrastive strength b, so an ablation over b reuses them).
STAGE_IGNORES = {
    "sft_pos": ("ce.b", "ce.shard_size", "ce.share_prefix"),
    "sft_neg": ("ce.b", "ce.shard_size", "ce.share_prefix"),
}
_ORDER = tuple(STAGE_INPUTS)


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
    if is_preference_data(config.get("data")):  # nothing is sampled; eval-only data settings key no stage
        signature = {k: v for k, v in signature.items() if k not in ("sample", "generation")}
        if "data" in signature:
            signature["data"] = {k: v for k, v in signature["data"].items() if k in IMPORT_SETTINGS}
    for dotted in STAGE_IGNORES.get(stage, ()):
        section, key = dotted.split(".")
        if isinstance(signature.get(section), dict):
            signature[section] = {k: v for k, v in signature[section].items() if k != key}
    return signature


# The settings of the align stage that make a method result (its method_dir holds one).
METHOD_KEYS = BY_NAME["align"].settings


def align_input(paths: RunPaths, objective: Objective) -> tuple[str, Path] | None:
    """(upstream stage, file) the align stage trains `objective` on: the scored pairs when it needs CE
    scores, the positives (SFT), the pairs, or nothing (the baseline)."""
    if not objective.trains:
        return None
    if objective.trains_on is TrainsOn.POSITIVES:
        return "select", paths.positives
    return ("score", paths.scored_pairs) if objective.needs_scores else ("select", paths.pairs)


def input_files(cfg: DictConfig, paths: RunPaths, stage: str, objective: Objective | None = None
                ) -> list[tuple[str, Path]]:
    """(upstream stage, file) that `stage` reads. `objective`: the run's (built from cfg.method when a caller
    outside a run, a test or a script, gives none)."""
    if BY_NAME[stage].level == "method" and objective is None:
        objective = objective_of(cfg.method)
    inputs = []
    for spec in BY_NAME[stage].inputs:
        if spec == ALIGN_INPUT:
            inputs += [x for x in [align_input(paths, objective)] if x]
            continue
        up, name = spec.split(".")
        if (up == "sample" and paths.preference) or (up == "align" and not objective.trains):
            continue  # the user's rows replace the samples (stage_identity hashes them); nothing was aligned
        inputs.append((up, getattr(paths, name)))
    return inputs


def read_marker(paths: RunPaths, stage: str) -> dict | None:
    marker = paths.marker(stage)
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):  # written atomically, so only by hand: redo the stage
        log.warning(f"[{stage}] {marker}: unreadable marker: the stage is redone")
        return None


def input_digest(paths: RunPaths, stage: str, path: Path) -> str | None:
    """An upstream artifact's content hash: as its (verified) marker recorded it, else from the file."""
    marker = read_marker(paths, stage) or {}
    recorded = (marker.get("artifacts") or {}).get(paths.name(path))
    if recorded:
        return recorded["sha256"]
    return ident.describe(path)["sha256"] if path.exists() else None


def preferences_digest(data: DictConfig) -> str:
    """The user's preference rows by content: a file's or a save_to_disk folder's sha256, a hub dataset's
    fingerprint."""
    if data.path.startswith("hf:"):
        return ident.text_digest([data.path, data.split, hub_fingerprint(data.path, data.split)])
    return ident.describe(Path(data.path).expanduser())["sha256"]


def stage_identity(cfg: DictConfig, paths: RunPaths, stage: str, objective: Objective | None = None, *,
                   questions: str | None = None) -> dict:
    """What `stage`'s artifact is made of: its settings (and its inputs' settings), its inputs' content
    hashes, the base model's identity and, for sample, the training questions' digest."""
    inputs = {paths.name(path): input_digest(paths, up, path)
              for up, path in input_files(cfg, paths, stage, objective)}
    if stage == "sample":
        if questions is None:
            from cdpo.pipeline import context  # the data loaders (and torch): only for this stage

            questions = ident.questions_digest(context.problems(cfg, cfg.data.train_split, cfg.data.train_limit))
        inputs["questions"] = questions
    if stage == "select" and paths.preference:  # the user's rows, by content (an edited file redoes select)
        inputs["preferences"] = preferences_digest(cfg.data)
    inputs["model"] = ident.model_identity(cfg.model)
    settings = stage_signature(cfg, stage) if stage in STAGE_INPUTS else {}
    return {"hash": ident.text_digest([stage, settings, inputs])[:16], "inputs": inputs}


def finished(paths: RunPaths, stage: str, identity: dict, cfg: DictConfig) -> bool:
    """Whether `stage` is finished with this identity and its artifacts are intact. A missing artifact
    means redo; one that no longer matches its marker (truncated, edited) is refused, not overwritten."""
    marker = read_marker(paths, stage)
    if marker is None:
        return False
    if marker.get("identity", {}).get("hash") != identity["hash"]:
        if stage == "align":
            conflict = [c for c in changed_settings(paths, stage, cfg) if c.split(".")[0].split(":")[0] in METHOD_KEYS]
            if conflict:
                raise SettingsConflictError(
                    f"{paths.method} holds a {cfg.method.name} result of other settings ({'; '.join(conflict[:4])}): "
                    "give this run its own method_dir, e.g. method_dir='${run_dir}/${method.name}-seed${seed}-lr"
                    "${align.lr}', or delete that folder")
        why = _why_other(paths, stage, cfg, marker, identity)
        log.info(f"[{stage}] made from other settings or inputs ({why}): redoing it")
        return False
    for path in paths.artifacts(stage):
        if _missing(paths, stage, path, marker):
            log.warning(f"[{stage}] {path}: missing: redoing the stage")
            return False
    return True


def _missing(paths: RunPaths, stage: str, path: Path, marker: dict) -> bool:
    """Whether an artifact of a finished stage is gone (checking the others against the marker): an optional
    one that its marker does not list was never written."""
    if check_artifact(paths, stage, path, marker) != "missing":
        return False
    return not paths.optional(path) or paths.name(path) in (marker.get("artifacts") or {})


def _why_other(paths: RunPaths, stage: str, cfg: DictConfig, marker: dict, identity: dict) -> str:
    changed = changed_settings(paths, stage, cfg)
    saved = marker.get("identity", {}).get("inputs", {})
    changed += [f"{k} changed" for k, v in identity["inputs"].items() if saved.get(k) != v]
    if not marker.get("identity"):
        changed.append("made by an earlier version without content hashes")
    return "; ".join(changed[:5]) + (" ..." if len(changed) > 5 else "") or "settings"


def check_artifact(paths: RunPaths, stage: str, path: Path, marker: dict | None = None) -> str | None:
    """None when `path` matches its marker, "missing" when it is gone; raises CorruptArtifactError,
    naming the file, what is wrong and what to do, when it is there but differs (truncated, edited)."""
    marker = marker if marker is not None else read_marker(paths, stage) or {}
    expected = (marker.get("artifacts") or {}).get(paths.name(path))
    if not path.exists():
        return "missing"
    if expected is None:
        return None  # a marker of an earlier version: its identity does not match either
    problem = ident.verify(path, expected)
    if problem:
        raise CorruptArtifactError(
            f"{path}: {problem}. Delete {paths.marker(stage)} to redo stage {stage} (and what uses it), or keep the "
            f"file as it is with: python -m cdpo.pipeline.accept {paths.run} {stage}"
            + (f" {paths.method}" if BY_NAME[stage].level == "method" else ""))
    return None


def check_inputs(cfg: DictConfig, paths: RunPaths, stage: str, objective: Objective | None = None,
                 known: dict[str, dict] | None = None) -> None:
    """Refuse to run `stage` on inputs that are missing, unfinished, made with other settings or damaged:
    the result would mix them with this run's settings. `known`: identities already computed in this run
    (stage -> identity), not computed again."""
    if paths.preference and stage not in ("sample", "select"):  # an edited preference file, at any depth
        imported_from = read_marker(paths, "select") or {}
        imported = ((imported_from.get("identity") or {}).get("inputs") or {}).get("preferences")
        if imported is not None and imported != preferences_digest(cfg.data):
            raise StaleInputError(f"{paths.pairs} was imported from other contents of {cfg.data.path}: run "
                                  "stage=select first, or stage=all")
    for up, path in input_files(cfg, paths, stage, objective):
        marker = read_marker(paths, up)
        if marker is None:
            what = "missing" if not path.exists() else f"not finished (no {paths.marker(up).name})"
            raise StaleInputError(f"{path}: {what}: run stage={up} first, or stage=all")
        changed = changed_settings(paths, up, cfg)
        if changed:
            raise StaleInputError(
                f"{path} was made with other settings ({'; '.join(changed[:4])}): running {stage} on it would mix "
                f"them with this run's; run stage={up} first, or stage=all")
        # an input made from inputs that have changed since (an upstream stage redone or accepted): stale
        current = (known or {}).get(up) or stage_identity(cfg, paths, up, objective)
        if (marker.get("identity") or {}).get("hash") != current["hash"]:
            raise StaleInputError(f"{path} was made from inputs that have changed since "
                                  f"({_why_other(paths, up, cfg, marker, current)}): run stage={up} first, or stage=all")
        if check_artifact(paths, up, path, marker) == "missing":
            raise StaleInputError(f"{path}: missing: run stage={up} first, or stage=all")


def reuse_stage(source: RunPaths, paths: RunPaths, stage: str, identity: dict) -> bool:
    """Carry a finished shared stage over from another run_dir when it has this run's identity (the same
    settings and input contents) and its artifacts are intact. Files are hard-linked (every artifact is
    replaced by rename, never rewritten in place, so the two run_dirs cannot alter each other's copy),
    directories, markers and configs copied."""
    if BY_NAME[stage].level != "run" or source.run.resolve() == paths.run.resolve():
        return False
    marker = read_marker(source, stage)
    if marker is None or marker.get("identity", {}).get("hash") != identity["hash"]:
        return False
    for src in source.artifacts(stage):
        if _missing(source, stage, src, marker):
            return False
    for src in source.artifacts(stage):
        dst = paths.run / src.relative_to(source.run)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if not src.exists():  # an optional artifact that was not written
            continue
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            try:
                os.link(src, dst)
            except OSError:  # another file system
                shutil.copy2(src, dst)
    shutil.copy2(source.run / f"{stage}.config.yaml", paths.run / f"{stage}.config.yaml")
    # the marker last (the stage is done), saying where from: the report's cost table counts its time once
    write_json(paths.marker(stage), {**marker, "reused_from": str(source.run)})
    return True


def mark_done(paths: RunPaths, stage: str, cfg: DictConfig, summary: dict, identity: dict | None = None) -> dict:
    """Write the stage's config and then its marker: the summary, the identity and a description (size,
    records, sha256) of every artifact, which readers verify before using it. Returns the marker."""
    marker = paths.marker(stage)
    marker.parent.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_yaml(cfg, resolve=True)
    _atomic_write_text(marker.parent / f"{stage}.config.yaml", lambda f: f.write(config))
    artifacts = {paths.name(p): ident.describe(p) for p in paths.artifacts(stage) if p.exists()}
    content = {**summary, "identity": identity or {}, "artifacts": artifacts}
    write_json(marker, content)
    return content


def accept(paths: RunPaths, stage: str) -> None:
    """Record the stage's artifacts as they are now (edited on purpose) in its marker."""
    marker = read_marker(paths, stage)
    if marker is None:
        raise StaleInputError(f"{paths.marker(stage)}: no marker to update")
    marker["artifacts"] = {paths.name(p): ident.describe(p) for p in paths.artifacts(stage) if p.exists()}
    marker["accepted"] = True
    write_json(paths.marker(stage), marker)


def _shards(items: Sequence, shard_size: int, shard_dir: Path):
    for index, start in enumerate(range(0, len(items), shard_size)):
        yield shard_dir / f"shard-{index:05d}.jsonl", items[start:start + shard_size]


def _finished_shard(path: Path, shard: Sequence, key: Callable[[Any], str]) -> list[dict] | None:
    """The records of a shard file that holds exactly these items, else None."""
    if path.exists():
        try:
            done = read_jsonl(path)
        except DataError:  # a damaged shard (written atomically, so by hand): redone
            return None
        if [r.get("key") for r in done] == [key(item) for item in shard]:
            return done
    return None


def _signature_matches(shard_dir: Path, signature: dict) -> bool:
    sig_path = shard_dir / "signature.json"
    try:
        return sig_path.exists() and json.loads(sig_path.read_text()) == signature
    except json.JSONDecodeError:
        return False


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
    made with the same `signature` (the stage's identity: settings and input contents) and holds the same items
    (by `key`, which must equal each output record's "key" field); otherwise the shards are redone.
    `on_skip(n)` is called for every finished shard (its n items) before any work starts: progress
    bars count them as done from the start."""
    if shard_dir.exists() and not _signature_matches(shard_dir, signature):
        shutil.rmtree(shard_dir)  # made with other settings: stale
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_json(shard_dir / "signature.json", signature)
    shards = [(path, shard, _finished_shard(path, shard, key)) for path, shard in _shards(items, shard_size, shard_dir)]
    for _, shard, done in shards:
        if done is not None and on_skip:
            on_skip(len(shard))
    records: list[dict] = []
    for path, shard, done in shards:
        if done is None:
            signals.check()  # a stop swallowed inside the last shard's work: stop before the next one
            done = work(shard)
            write_jsonl(path, done)
        records.extend(done)
    write_jsonl(out_path, records)
    return records


def load(path: Path) -> list[dict]:
    return [r for _, r in iter_jsonl(path)]

