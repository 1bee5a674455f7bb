"""The HTML token viewer: its markup, its self-containment, and the page in a real (headless) Chromium."""
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cdpo.analysis.viewer import chromium, entries, find_chromium, main, render, screenshot, write_viewer  # noqa: E402
from cdpo.io import write_jsonl  # noqa: E402
from cdpo.models import load_tokenizer  # noqa: E402

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="Chromium not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded:smollm2-135m-instruct")


def _pairs(tok, n=4):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
    pairs = []
    for i in range(n):
        right, wrong = enc(f"{i} + 2 = {i + 2}.\nThe answer is {i + 2}."), enc(f"{i} + 2 = {i + 3}.\nThe answer is {i + 3} <b>.")
        low = 0.05 * (n - i)  # the last pair has the lowest p_ce
        p_ce = [0.9] * len(wrong)
        p_ce[4] = low
        pairs.append({"id": f"q{i}", "pair": 0, "question": f"What is {i} + 2?", "answers": [str(i + 2)],
                      "prompt_ids": [1], "chosen": tok.decode(right, skip_special_tokens=True), "chosen_ids": right,
                      "chosen_p_ce": [0.97] * len(right), "rejected_ids": wrong, "rejected_p_ce": p_ce,
                      "rejected_answer": str(i + 3), "critical_index": 4})
    return pairs


def _rollouts(pairs):
    r = pairs[0]
    return [{"key": "q0#0", "response_ids": r["rejected_ids"], "m": 4, "positions": [0, 2, 3, 4, 6],
             "correct": [4, 2, 1, 0, 0], "critical_index": 3}]


class _Tokens(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.external, self.in_token = [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append({"correct": a["data-correct"], "score": float(a["data-score"]), "tokens": []})
        if tag == "span" and "tok" in a.get("class", "").split() and self.sections:
            self.sections[-1]["tokens"].append(a)
            self.sections[-1].setdefault("text", [])
            self.in_token = True
        for name in ("src", "href"):
            if a.get(name):
                self.external.append(a[name])

    def handle_endtag(self, tag):
        self.in_token = self.in_token and tag != "span"

    def handle_data(self, data):
        if self.in_token:
            self.sections[-1]["text"].append(data)


def test_markup_has_every_token_shaded_and_the_critical_tokens_marked(tok):
    pairs = _pairs(tok)
    items = entries(pairs, tok, {r["key"]: r for r in _rollouts(pairs)})
    page = render(items)
    parsed = _Tokens()
    parsed.feed(page)
    assert [len(s["tokens"]) for s in parsed.sections] == [len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    assert parsed.external == []  # self-contained: nothing to fetch
    assert not re.search(r"https?://", page)
    rejected = parsed.sections[1]["tokens"]
    assert "ce-crit" in rejected[4]["class"] and "roll-crit" in rejected[3]["class"]
    assert rejected[4]["data-p"] == "0.2000" and "rgba(220,38,38,0.800)" in rejected[4]["style"]
    assert rejected[2]["data-r"] == "0.5000" and "data-r" not in rejected[1]  # position 1 was not sampled
    assert all("data-r" not in t for s in parsed.sections[3:] for t in s["tokens"])  # no rollouts for those
    # token text is escaped: the page shows exactly the decoded response ("<b>" included), newlines marked
    shown = ["".join(sec["text"]).replace("\u200b", "") for sec in parsed.sections]
    decoded = [tok.decode(p[k], skip_special_tokens=False).replace("\n", "↵\n") for p in pairs
               for k in ("chosen_ids", "rejected_ids")]
    assert shown == decoded and "<b>" in shown[1]
    # the predicted answer of a correct response is extracted from its text
    assert items[0]["predicted"] == "2" and items[1]["predicted"] == "3"


def test_cli_writes_the_page_and_rejects_bad_input(tmp_path, tok, capsys):
    write_jsonl(tmp_path / "scored.jsonl", _pairs(tok, 2))
    main([str(tmp_path / "scored.jsonl"), "-o", str(tmp_path / "v.html")])
    assert (tmp_path / "v.html").read_text().count('<section class="traj') == 4
    write_jsonl(tmp_path / "bad.jsonl", [{"id": "q", "chosen_ids": [1]}])
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "bad.jsonl")])
    assert stop.value.code == 2 and "bad.jsonl:1: missing rejected_ids" in capsys.readouterr().err


def test_cli_screenshot_without_chromium_says_what_to_install(tmp_path, tok):
    """`--screenshot` on a machine without Chromium (a PATH without it): one line naming the package, exit 2,
    before the tokenizer is loaded or the page written (it used to end in a traceback after both)."""
    write_jsonl(tmp_path / "scored.jsonl", _pairs(tok, 1))
    (tmp_path / "bin").mkdir()
    proc = subprocess.run([sys.executable, "-m", "cdpo.analysis.viewer", str(tmp_path / "scored.jsonl"),
                           "-o", str(tmp_path / "v.html"), "--screenshot", str(tmp_path / "v.png"),
                           "--tokenizer", "no-such-org/no-such-tokenizer"],  # a load would fail differently
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": str(tmp_path / "bin")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "apt-get install chromium" in proc.stderr and "--screenshot" in proc.stderr
    assert not (tmp_path / "v.html").exists()


@needs_chromium
def test_page_renders_in_chromium(tmp_path, tok):
    import numpy as np
    from PIL import Image, ImageStat

    pairs = _pairs(tok)
    page = write_viewer(pairs, tok, tmp_path / "viewer.html", rollouts=_rollouts(pairs))
    png = screenshot(page, tmp_path / "viewer.png", width=900, height=700)
    image = Image.open(png).convert("RGB")
    assert image.size == (900, 700)
    assert ImageStat.Stat(image.convert("L")).stddev[0] > 20  # not a blank page
    # red p_ce shading is painted: strongly red pixels (low-p_ce tokens) exist
    r, g, b = np.asarray(image).astype(int).transpose(2, 0, 1)
    assert ((r > 200) & (g < 120) & (b < 120)).sum() > 50

    # the scripts ran: the fragment's filter hides the correct responses and sorts by lowest p_ce
    dom = chromium(page, "--dump-dom", fragment="show=incorrect&sort=score&shade=rollout").stdout
    assert 'data-state="show=incorrect&amp;sort=score&amp;shade=rollout"' in dom
    parsed = _Tokens()
    parsed.feed(dom)
    assert sum(len(s["tokens"]) for s in parsed.sections) == sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    sections = re.findall(r'<section class="traj (\w+)"[^>]*?data-score="([\d.]+)"([^>]*)>', dom)
    visible = [(kind, float(score)) for kind, score, rest in sections if "hidden" not in rest]
    assert [k for k, _ in visible] == ["incorrect"] * 4
    assert [s for _, s in visible] == sorted(s for _, s in visible) and visible[0][1] == pytest.approx(0.05)
    assert all("hidden" in rest for kind, _, rest in sections if kind == "correct")
    # rollout shading: a sampled token with successes is green, one without grey, unsampled ones clear
    first = dom[dom.index('data-order="1"'):]
    assert "rgba(22, 163, 74" in first.split("</section>")[0]
