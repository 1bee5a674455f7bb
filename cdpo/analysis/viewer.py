"""A self-contained HTML page (inline CSS and JS, no network) of scored trajectories.

    python -m cdpo.analysis.viewer runs/<run>/scored_pairs.jsonl [--rollouts <rollouts.jsonl>] [-o viewer.html]

Every chosen and rejected response of a scored-pairs file, its tokens shaded by p_ce (red = low);
where `rollout.py` sampled a token, a strip below it shows the success rate of continuations
resampled from that token on (green = some succeed, grey = none; no strip = not sampled). The
lowest-p_ce token of a rejected response is boxed, the rollout critical token underlined; question,
gold and predicted answers. Controls: show all / correct / incorrect, file order or lowest p_ce
first, background (p_ce, rollout success, none). The state is kept in the URL fragment
(`viewer.html#show=incorrect&sort=score&shade=rollout`).
"""
from __future__ import annotations

import argparse
import html
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cdpo.analysis.tokens import token_pieces
from cdpo.errors import UserError
from cdpo.grading import extract_answer
from cdpo.io import DataError, iter_jsonl, read_jsonl


def read_scored(path: Path) -> list[dict]:
    pairs = []
    for lineno, pair in iter_jsonl(path):
        missing = [k for k in ("id", "chosen_ids", "rejected_ids") if k not in pair]
        if missing:
            raise DataError(f"{path}:{lineno}: missing {', '.join(missing)} (expected scored pairs)")
        pairs.append(pair)
    return pairs


def _argmin(xs):
    return min(range(len(xs)), key=xs.__getitem__) if xs else None


def entries(pairs: list[dict], tokenizer, rollouts: dict[str, dict] | None = None) -> list[dict]:
    """One entry per response of every scored pair (chosen: correct, rejected: incorrect)."""
    rollouts = rollouts or {}
    out = []
    for pair in pairs:
        key = pair.get("key") or f"{pair['id']}#{pair.get('pair', 0)}"
        for side, correct in (("chosen", True), ("rejected", False)):
            ids, p_ce = pair[f"{side}_ids"], pair.get(f"{side}_p_ce")
            text = pair.get(side) if isinstance(pair.get(side), str) else tokenizer.decode(ids, skip_special_tokens=True)
            predicted = pair.get("rejected_answer") if side == "rejected" else None
            entry = {"key": key, "side": side, "correct": correct, "question": pair.get("question", ""),
                     "gold": ", ".join(map(str, pair.get("answers", []))), "predicted": predicted or extract_answer(text),
                     "pieces": token_pieces(tokenizer, ids), "p_ce": p_ce, "rates": None,
                     "ce_critical": None, "rollout_critical": None}
            if side == "rejected":
                entry["ce_critical"] = pair.get("critical_index", _argmin(p_ce or []))
                roll = rollouts.get(key)
                if roll is not None and roll["response_ids"] == ids:
                    rates = [None] * len(ids)
                    for t, k in zip(roll["positions"], roll["correct"]):
                        rates[t] = k / roll["m"]
                    entry["rates"], entry["rollout_critical"] = rates, roll["critical_index"]
            out.append(entry)
    return out


def _pce_color(p: float | None) -> str:
    return "transparent" if p is None else f"rgba(220,38,38,{1 - p:.3f})"


def _rate_color(r: float) -> str:
    return f"rgba(22,163,74,{0.2 + 0.8 * r:.3f})" if r > 0 else "rgba(100,116,139,0.55)"


def _token(i: int, piece: str, entry: dict) -> str:
    p = entry["p_ce"][i] if entry["p_ce"] else None
    r = entry["rates"][i] if entry["rates"] else None
    classes = ["tok"] + (["ce-crit"] if i == entry["ce_critical"] else []) + (
        ["roll-crit"] if i == entry["rollout_critical"] else [])
    data = ("" if p is None else f' data-p="{p:.4f}"') + ("" if r is None else f' data-r="{r:.4f}"')
    tip = f"#{i}" + ("" if p is None else f"  p_ce {p:.3f}") + ("" if r is None else f"  rollout {100 * r:.0f}%")
    shown = html.escape(piece.replace("\n", "↵\n")) or "&#8203;"  # an empty piece still gets a span
    # background: p_ce; a strip under the token: the rollout success rate, where sampled
    strip = "" if r is None else f";box-shadow:inset 0 -5px 0 {_rate_color(r)}"
    return (f'<span class="{" ".join(classes)}"{data} title="{html.escape(tip)}" '
            f'style="background:{_pce_color(p)}{strip}">{shown}</span>')


def _section(order: int, e: dict) -> str:
    score = min(e["p_ce"]) if e["p_ce"] else 1.0
    facts = [f"gold <b>{html.escape(e['gold'])}</b>",
             f"predicted <b>{html.escape(str(e['predicted']))}</b> {'✓' if e['correct'] else '✗'}",
             f"lowest p_ce {score:.3f}"]
    if e["ce_critical"] is not None:
        facts.append(f"CE critical token #{e['ce_critical']} {html.escape(repr(e['pieces'][e['ce_critical']]))}")
    if e["rates"] is not None:
        c = e["rollout_critical"]
        facts.append("rollout: no successful continuation from any prefix" if c is None else
                     f"rollout critical token #{c} {html.escape(repr(e['pieces'][c]))}")
    tokens = "".join(_token(i, piece, e) for i, piece in enumerate(e["pieces"]))
    kind = "correct" if e["correct"] else "incorrect"
    return (f'<section class="traj {kind}" data-correct="{int(e["correct"])}" data-order="{order}" '
            f'data-score="{score:.5f}">\n<h2>{html.escape(e["key"])} · {e["side"]}</h2>\n'
            f'<p class="q">{html.escape(e["question"])}</p>\n<p class="meta">{" · ".join(facts)}</p>\n'
            f'<div class="tokens">{tokens}</div>\n</section>')


_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#111;background:#fff}
header{position:sticky;top:0;background:#f8fafc;border-bottom:1px solid #cbd5e1;padding:8px 16px;z-index:1}
h1{font-size:18px;margin:0 0 4px} h2{font-size:14px;margin:0 0 4px;color:#334155}
main{padding:8px 16px} .traj{border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;margin:8px 0}
.traj.incorrect{border-left:4px solid #b91c1c} .traj.correct{border-left:4px solid #15803d}
.q{margin:0 0 4px;color:#0f172a} .meta{margin:0 0 6px;color:#475569;font-size:12px}
.tokens{font:13px/1.9 ui-monospace,monospace;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:2px;padding:1px 0} .ce-crit{outline:2px solid #7f1d1d}
.roll-crit{border-bottom:3px solid #1d4ed8;padding-bottom:1px} .controls label{margin-right:14px}
.legend{font-size:12px;color:#475569;margin-top:4px} .sw{display:inline-block;width:60px;height:10px;vertical-align:middle}
"""

_JS = """
const list = document.getElementById('list');
const sections = Array.from(list.children);
const controls = ['show', 'sort', 'shade'].map(id => document.getElementById(id));
function color(mode, el) {
  if (mode === 'pce') return el.dataset.p === undefined ? 'transparent' : `rgba(220,38,38,${(1 - el.dataset.p).toFixed(3)})`;
  if (mode === 'none' || el.dataset.r === undefined) return 'transparent';
  const r = parseFloat(el.dataset.r);
  return r > 0 ? `rgba(22,163,74,${(0.2 + 0.8 * r).toFixed(3)})` : 'rgba(100,116,139,0.55)';
}
let shaded = 'pce';
function apply() {
  const [show, sort, shade] = controls.map(c => c.value);
  const key = s => sort === 'score' ? parseFloat(s.dataset.score) : parseInt(s.dataset.order);
  for (const s of sections.slice().sort((a, b) => key(a) - key(b))) {
    list.appendChild(s);
    s.hidden = show !== 'all' && (show === 'correct') !== (s.dataset.correct === '1');
  }
  if (shade !== shaded) {
    for (const t of document.querySelectorAll('.tok')) t.style.background = color(shade, t);
    shaded = shade;
  }
  const state = new URLSearchParams({show, sort, shade}).toString();
  try { history.replaceState(null, '', '#' + state); } catch (e) {}
  document.body.dataset.state = state;
}
const initial = new URLSearchParams(location.hash.slice(1));
for (const c of controls) {
  if (initial.has(c.id) && [...c.options].some(o => o.value === initial.get(c.id))) c.value = initial.get(c.id);
  c.addEventListener('change', apply);
}
apply();
"""


def render(items: list[dict], title: str = "critical tokens") -> str:
    n_wrong = sum(not e["correct"] for e in items)
    has_rollouts = any(e["rates"] is not None for e in items)
    sections = "\n".join(_section(i, e) for i, e in enumerate(items))
    shade_rollout = '<option value="rollout">rollout success</option>' if has_rollouts else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><header><h1>{html.escape(title)}</h1>
<div class="controls">{len(items)} trajectories ({len(items) - n_wrong} correct, {n_wrong} incorrect) ·
<label>show <select id="show"><option value="all">all</option><option value="incorrect">incorrect</option>
<option value="correct">correct</option></select></label>
<label>order <select id="sort"><option value="file">file order</option><option value="score">lowest p_ce first</option>
</select></label>
<label>background <select id="shade"><option value="pce">p_ce</option>{shade_rollout}<option value="none">none</option>
</select></label></div>
<div class="legend">background: p_ce <span class="sw" style="background:linear-gradient(90deg,rgba(220,38,38,1),rgba(220,38,38,0))">
</span> 0 → 1 · strip below a token: correct continuations resampled from this token on
<span class="sw" style="background:linear-gradient(90deg,rgba(22,163,74,.2),rgba(22,163,74,1))"></span> some → all,
<span class="sw" style="width:14px;background:rgba(100,116,139,.55)"></span> none (no strip: not sampled) ·
<span class="tok ce-crit">lowest p_ce</span> · <span class="tok roll-crit">rollout critical token</span> · ↵ newline</div>
</header>
<main id="list">
{sections}
</main>
<script>{_JS}</script>
</body></html>
"""


def write_viewer(pairs: list[dict], tokenizer, out: Path, *, rollouts: list[dict] | None = None,
                 title: str = "critical tokens") -> Path:
    by_key = {r["key"]: r for r in rollouts or []}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(entries(pairs, tokenizer, by_key), title), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------
# Headless Chromium: screenshots for the README and the browser test

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


NO_CHROMIUM = "no Chromium found on PATH (chromium, chromium-browser, google-chrome): apt-get install chromium"


class ChromiumMissingError(UserError, FileNotFoundError):
    """A screenshot was asked for where no Chromium is installed."""


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def chromium(page: Path, *args: str, fragment: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    exe = find_chromium()
    if exe is None:
        raise ChromiumMissingError(NO_CHROMIUM)
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="cdpo-chromium-") as profile:
        return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=timeout, check=True)


def screenshot(page: Path, png: Path, *, width: int = 1200, height: int = 900, fragment: str = "") -> Path:
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    chromium(page, f"--screenshot={png}", f"--window-size={width},{height}", fragment=fragment)
    return png


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cdpo.analysis.viewer", description=__doc__.split("\n\n")[0])
    ap.add_argument("scored", type=Path, help="scored pairs JSONL (the score stage's scored_pairs.jsonl)")
    ap.add_argument("--rollouts", type=Path, help="rollouts.jsonl written by rollout.py (adds rollout shading)")
    ap.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct", help="model path or embedded alias")
    ap.add_argument("-o", "--output", type=Path, help="default: <scored stem>.html beside it")
    ap.add_argument("--limit", type=int, help="first N pairs only")
    ap.add_argument("--screenshot", type=Path, help="also save a headless-Chromium screenshot (PNG)")
    args = ap.parse_args(argv)
    try:
        if args.screenshot and find_chromium() is None:  # before the tokenizer is loaded and the page written
            raise ChromiumMissingError(f"--screenshot: {NO_CHROMIUM} (or leave out --screenshot)")
        pairs = read_scored(args.scored)[:args.limit]
        rollouts = read_jsonl(args.rollouts) if args.rollouts else None
    except (FileNotFoundError, UserError) as e:  # bad input, no Chromium: one line and exit 2
        print(f"viewer: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from cdpo.models import load_tokenizer

    out = write_viewer(pairs, load_tokenizer(args.tokenizer), args.output or args.scored.with_suffix(".html"),
                       rollouts=rollouts, title=f"critical tokens: {args.scored}")
    print(f"wrote {out} ({len(pairs)} pairs)")
    if args.screenshot:
        print(f"wrote {screenshot(out, args.screenshot)}")


if __name__ == "__main__":
    main()
