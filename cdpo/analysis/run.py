"""`python rollout.py`: rollouts of the incorrect trajectories of a scored-pairs file (sharded and
resumable), then the pass@k plot, the agreement table and the token viewer, under rollout.output_dir."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from cdpo.analysis import figures, report
from cdpo.analysis.rollout import RolloutSettings, expected_work, rollout_trajectory, seed_for
from cdpo.analysis.tokens import line_numbers, token_pieces
from cdpo.analysis.viewer import screenshot, write_viewer
from cdpo.generation import GenerationStats, generate_ids
from cdpo.io import DataError, iter_jsonl, write_json
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import pending_items, run_sharded
from cdpo.pipeline.identity import file_identity
from cdpo.pipeline.score import pair_key

NEEDED = ("id", "prompt_ids", "rejected_ids", "rejected_p_ce", "answers")


def load_trajectories(path: Path, limit: int | None) -> tuple[list[dict], list[dict]]:
    """(scored pairs, their rejected responses as rollout items), the first `limit` of them."""
    pairs, items = [], []
    for lineno, p in iter_jsonl(path):
        missing = [k for k in NEEDED if k not in p]
        if missing:
            raise DataError(f"{path}:{lineno}: missing {', '.join(missing)} (expected the score stage's scored pairs)")
        pairs.append(p)
    for p in pairs[:limit]:
        p_ce = p["rejected_p_ce"]
        lowest = p.get("critical_index")
        items.append({"key": pair_key(p), "id": p["id"], "question": p.get("question", ""), "answers": p["answers"],
                      "prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"],
                      "rejected_answer": p.get("rejected_answer"), "ce_p_ce": p_ce,
                      "ce_critical_index": lowest if lowest is not None else min(range(len(p_ce)), key=p_ce.__getitem__)})
    return pairs, items


def settings(cfg: DictConfig) -> RolloutSettings:
    r = cfg.rollout
    return RolloutSettings(m=r.m, stride=r.stride, refine=r.refine, compare_n=r.compare_n, temperature=r.temperature,
                           top_p=r.top_p, max_new_tokens=r.max_new_tokens, batch_size=r.batch_size,
                           stop=context.stops(cfg), grading=cfg.data.get("grading", "strict"))


def measured_tokens_per_s(model, tok, item: dict, s: RolloutSettings) -> float:
    """Generation speed on one full batch of continuations from the first trajectory's prompt."""
    stats = GenerationStats()
    generate_ids(model, tok, [item["prompt_ids"]], n=s.batch_size, temperature=s.temperature, top_p=s.top_p,
                 max_new_tokens=s.max_new_tokens, stop=s.stop, seed=0, batch_size=s.batch_size, progress=False,
                 stats=stats)
    return stats.tokens_per_s


def _describe(r: dict, pieces: list[str]) -> str:
    c = r["critical_index"]
    if c is None:
        return "no successful continuation from any prefix"
    rate = dict(zip(r["positions"], r["correct"]))[c] / r["m"]
    return (f"critical token #{c} {pieces[c]!r} (success {rate:.2f} before it, 0 after); "
            f"with it {r['with']['correct']}/{r['with']['n']}, replaced {r['without']['correct']}/{r['without']['n']}")


def run(cfg: DictConfig) -> dict:
    t_start = time.perf_counter()
    rc = cfg.rollout
    source, out_dir = Path(rc.input), Path(rc.output_dir)
    pairs, items = load_trajectories(source, rc.limit)
    if not items:
        raise DataError(f"{source}: no scored pairs to analyse")
    s = settings(cfg)
    if rc.threads:
        # several threads on oversubscribed cores wait on each other at every op: 4x slower here
        torch.set_num_threads(rc.threads)
    tok = context.tokenizer(cfg)
    model = context.base_model(cfg)  # the policy that sampled the trajectories: no adapter

    c = OmegaConf.to_container(cfg, resolve=True)
    signature = {"model": c["model"], "data": c["data"], "seed": c["seed"], "settings": vars(s),
                 "input": [str(source.resolve()), file_identity(source)]}  # its content, not its mtime
    shard_dir = out_dir / "shards"
    todo = pending_items(items, rc.shard_size, shard_dir, key=lambda i: i["key"], signature=signature)
    conts, tokens = expected_work(todo, s)
    line = (f"[rollout] {len(items)} incorrect trajectories, {len(todo)} to do "
            f"({sum(len(i['response_ids']) for i in todo)} tokens), m={s.m}, stride {s.stride}"
            f"{' + refinement' if s.refine and s.stride > 1 else ''}, {s.compare_n} samples with/without: "
            f"up to {conts:,} continuations, ~{tokens:,} new tokens expected")
    speed = None
    if rc.estimate and todo:
        speed = measured_tokens_per_s(model, tok, todo[0], s)
        line += f"; {speed:.0f} tokens/s on one batch of {s.batch_size} -> about {tokens / speed / 60:.1f} min"
    print(line, flush=True)

    stats = GenerationStats()
    bar = tqdm(total=len(items), desc="rollout", unit="traj", dynamic_ncols=True)

    def work(shard: list[dict]) -> list[dict]:
        done = []
        for item in shard:
            pieces = token_pieces(tok, item["response_ids"])
            r = rollout_trajectory(model, tok, {**item, "token_pieces": pieces, "token_lines": line_numbers(pieces)},
                                   s, seed=seed_for(item["key"], cfg.seed), stats=stats)
            bar.write(f"[rollout] {item['key']}: {_describe(r, pieces)}; {r['new_tokens']} tokens in {r['seconds']:.0f} s")
            bar.update(1)
            done.append(r)
        return done

    records = run_sharded(items, rc.shard_size, shard_dir, work, out_dir / "rollouts.jsonl",
                          key=lambda i: i["key"], signature=signature, on_skip=bar.update)
    bar.close()

    curves = report.pass_at_k_curves(records)
    table = report.agreement(records, list(rc.windows))
    write_json(out_dir / "pass_at_k.json", curves)
    write_json(out_dir / "agreement.json", table)
    (out_dir / "agreement.md").write_text(report.agreement_markdown(table) + "\n")
    files = [out_dir / "rollouts.jsonl", out_dir / "pass_at_k.json", out_dir / "agreement.json", out_dir / "agreement.md"]
    if curves["trajectories"]:
        files.append(figures.plot_pass_at_k(curves, out_dir / "pass_at_k.png",
                                            f"{cfg.model.name} on {cfg.data.name}: {curves['trajectories']} incorrect "
                                            f"trajectories, {s.compare_n} samples each"))
        files.append(figures.plot_success_rates(records, out_dir / "success_rates.png"))
    files.append(write_viewer(pairs, tok, out_dir / "viewer.html", rollouts=records,
                              title=f"critical tokens: {cfg.model.name} on {cfg.data.name}"))
    if rc.screenshot:
        try:
            files.append(screenshot(out_dir / "viewer.html", out_dir / "viewer.png", width=1100, height=1000,
                                    fragment="show=incorrect"))
        except (subprocess.SubprocessError, OSError) as e:  # no Chromium, or it failed: the report matters more
            print(f"[rollout] no viewer screenshot: {e} (rollout.screenshot=false: none asked)")
    # totals over the trajectories (a resumed run reports the work of the runs that sampled them)
    new_tokens, seconds = sum(r["new_tokens"] for r in records), sum(r["seconds"] for r in records)
    summary = {"trajectories": len(records), "with_critical_token": table["with_critical_token"],
               "settings": vars(s), "threads": torch.get_num_threads(), "new_tokens": new_tokens,
               "rollout_seconds": round(seconds, 1), "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
               "this_run": {"new_tokens": stats.new_tokens, "seconds": round(time.perf_counter() - t_start, 1),
                            "tokens_per_s_probe": speed and round(speed, 1)},
               "pass_at_k": {k: {"with": curves["with"][k - 1], "without": curves["without"][k - 1]}
                             for k in (1, 4, 16, 64) if k <= len(curves["k"])}}
    write_json(out_dir / "summary.json", summary)
    print(report.agreement_markdown(table))
    print("pass@k with / without the critical token: " + ", ".join(
        f"k={k}: {100 * v['with']:.0f} % / {100 * v['without']:.0f} %" for k, v in summary["pass_at_k"].items()))
    print(f"[rollout] this run: {summary['this_run']['seconds']:.0f} s, {stats.new_tokens:,} new tokens; all "
          f"trajectories: {new_tokens:,} new tokens in {seconds:.0f} s ({summary['tokens_per_s']} tokens/s); wrote "
          + ", ".join(str(f) for f in files))
    return summary
