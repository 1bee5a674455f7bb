"""Table 1's layout: one row per method (or ablation value), one column per model x data set grouped
by data set with an average per group; cells are mean ± std over seeds. Every row is tested
against the reference row (cDPO by default) on the questions both answered."""
from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from statistics import mean

from cdpo.objectives import METHODS, row_labels
from cdpo.report.collect import SHARED_ROWS, Result
from cdpo.report.stats import mcnemar_exact, mean_std, paired_bootstrap

MODEL_NAMES = {"llama3_8b": "Llama-3 8B", "llama3_70b": "Llama-3 70B", "deepseek_math_7b": "DeepSeek-math 7B",
               "smollm2_135m": "SmolLM2 135M", "tiny": "tiny"}
DATA_NAMES = {"gsm8k": "GSM8K", "math500": "MATH500", "arith": "arith"}
log = logging.getLogger(__name__)


def _seeds(results: list[Result]) -> str:
    return ", ".join(str(r.seed) for r in results)


def _order(names, preferred) -> list:
    known = [n for n in preferred if n in names]
    return known + sorted(n for n in names if n not in preferred)


def _row_order(rows: set[str], rows_key: str) -> list[str]:
    shared = [r for r in SHARED_ROWS if r in rows]  # base and SFT first, as in Table 1
    rows = rows - set(shared)
    if rows_key == "method.name":  # Table 1's order (the baseline method first), then the user's own methods
        first = ["baseline"] if "baseline" in rows else []
        return first + shared + _order(rows - {"baseline"}, list(METHODS))
    try:  # ablation values: numbers in numeric order
        return shared + sorted(rows, key=float)
    except ValueError:
        return shared + sorted(rows)


def _as_row(value, rows: set[str]) -> str:
    """An expected row as the results name it: `1` is the row "1.0" of an ablation's numbers."""
    value, number = str(value), _number(str(value))
    if value in rows or number is None:
        return value
    return next((r for r in sorted(rows) if _number(r) == number), value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def row_label(row: str, rows_key: str, short: bool = False, labels: dict[str, str] | None = None) -> str:
    """"+ cDPO" in the table, "cDPO" in prose (short); "ce.b=0.5" for an ablation. `labels`: row -> the label
    its results' objective gives (`Result.label`: also a user's own class); else the registry's, else the name."""
    if row in SHARED_ROWS:
        return SHARED_ROWS[row]
    if rows_key != "method.name":
        return f"{rows_key}={row}"
    label = (labels or {}).get(row) or (row_labels().get(row) if row in METHODS else None) or row
    return label.removeprefix("+ ") if short else label


class Table:
    """Cells, averages and significance tests of a list of results."""

    def label(self, row: str, short: bool = False) -> str:
        return row_label(row, self.rows_key, short, self.labels)

    def __init__(self, results: list[Result], *, rows_key: str = "method.name", reference: str = "cdpo",
                 test: str = "bootstrap", alpha: float = 0.005, resamples: int = 10_000, seed: int = 0,
                 expect_rows: list[str] | None = None, expect_seeds: list[int] | None = None):
        """`expect_rows` / `expect_seeds`: the grid the results should cover, so that `missing` names what a
        partial grid lacks (rows: also what the results have; seeds: by default every seed some row has)."""
        if test not in ("bootstrap", "mcnemar"):
            raise ValueError(f"test={test!r}: choose bootstrap or mcnemar")
        if not results:
            raise ValueError("no results to report")
        self.rows_key, self.reference, self.test, self.alpha = rows_key, reference, test, alpha
        self.expect_rows = [_as_row(r, {x.row for x in results}) for r in expect_rows or []]
        self.expect_seeds = None if expect_seeds is None else sorted(int(s) for s in expect_seeds)
        self.by_cell: dict[tuple, list[Result]] = defaultdict(list)
        for r in results:
            self.by_cell[((r.model, r.data), r.row)].append(r)
        for cell in self.by_cell.values():
            cell.sort(key=lambda r: r.seed)
        datas = _order({r.data for r in results}, list(DATA_NAMES))
        models = _order({r.model for r in results}, list(MODEL_NAMES))
        self.groups = [(d, [(m, d) for m in models if any(c == (m, d) for c, _ in self.by_cell)]) for d in datas]
        self.columns = [c for _, cols in self.groups for c in cols]
        self.rows = _row_order({r.row for r in results}, rows_key)
        self.labels = {r.row: r.label for r in results if r.label}  # from each row's objective
        if reference not in self.rows:
            log.warning(f"report: reference={reference!r} is not a row of this report (its rows: "
                        f"{', '.join(self.rows)}): nothing is tested against it")
        self.tests = {(col, row): self._compare(col, row, resamples, seed)
                      for col in self.columns for row in self.rows
                      if row != reference and self.by_cell.get((col, reference)) and self.by_cell.get((col, row))}

    # --- cells -------------------------------------------------------------------------------
    def cell(self, col, row) -> dict | None:
        results = self.by_cell.get((col, row))
        if not results:
            return None
        accs = [100 * r.accuracy for r in results]
        m, s = mean_std(accs)
        return {"mean": m, "std": s, "seeds": [r.seed for r in results], "accuracies": accs}

    def average(self, cols, row) -> dict | None:
        """Mean over the group's columns; ± over seeds when every column has the same seeds."""
        cells = [self.cell(c, row) for c in cols]
        if len(cols) < 2 or any(c is None for c in cells):
            return None
        seeds = cells[0]["seeds"]
        if all(c["seeds"] == seeds for c in cells):
            per_seed = [mean(c["accuracies"][i] for c in cells) for i in range(len(seeds))]
            m, s = mean_std(per_seed)
            return {"mean": m, "std": s, "seeds": seeds, "accuracies": per_seed}
        return {"mean": mean(c["mean"] for c in cells), "std": None, "seeds": [], "accuracies": []}

    # --- significance ------------------------------------------------------------------------
    def _compare(self, col, row, resamples, seed) -> dict | None:
        """The row against the reference on the sample sets both have (`Result.samples`: in the embedded grid
        each seed is a replicate with its own samples and CE models, so a sample set only one of the two
        has would count as a method effect). The base row is the untrained model, the same for every
        sample set. Rows that share no sample set are compared across them, marked so and never starred."""
        ref, other = self.by_cell[(col, self.reference)], self.by_cell[(col, row)]
        common = {r.samples for r in ref} & {r.samples for r in other}
        matched = row == "base" or bool(common)
        if row != "base" and common:
            ref, other = [r for r in ref if r.samples in common], [r for r in other if r.samples in common]
        if any(r.correct is None for r in ref + other):
            return None  # a result without per-question predictions
        questions = sorted(set.intersection(*(set(r.correct) for r in ref + other)))
        if not questions:
            return None

        def score(results):  # per question: the fraction of seeds that solved it
            return [mean(r.correct[q] for r in results) for q in questions]

        boot = paired_bootstrap(score(ref), score(other), resamples=resamples, seed=seed)
        # McNemar needs one binary outcome per question and method: test each seed (matched by seed, or
        # every combination when the two share none) and keep the least significant
        pairs = [(x, y) for x in ref for y in other if x.seed == y.seed] or [(x, y) for x in ref for y in other]
        tests = [mcnemar_exact([x.correct[q] for q in questions], [y.correct[q] for q in questions]) for x, y in pairs]
        mc = max(tests, key=lambda m: m["p"])
        # each seed's own difference: with whole replicates as seeds, their spread is the sample set's effect,
        # which the interval above (the questions resampled, the sample sets fixed) does not contain
        by_seed = ([(100 * mean(x.correct[q] - y.correct[q] for q in questions), m["p"]) for (x, y), m in zip(pairs, tests)]
                   if matched else [])
        return {"questions": len(questions), "delta": 100 * boot["delta"], "ci_low": 100 * boot["ci_low"],
                "ci_high": 100 * boot["ci_high"], "p_bootstrap": boot["p"], "p_mcnemar": mc["p"],
                "ref_only": mc["n10"], "other_only": mc["n01"], "matched": matched, "by_seed": by_seed,
                "per_seed": [d for d, _ in by_seed] if len(by_seed) > 1 else [],
                "seeds": _seeds(ref) if matched else f"{_seeds(ref)} vs {_seeds(other)} (no sample set in common)"}

    def p(self, col, row) -> float | None:
        t = self.tests.get((col, row))
        return None if t is None else t["p_bootstrap" if self.test == "bootstrap" else "p_mcnemar"]

    def significant(self, col) -> bool:
        """The reference beats every other row of the column with p < alpha, each on the sample sets both have."""
        others = [row for row in self.rows if row != self.reference and (col, row) in self.tests]
        return bool(others) and all(self.tests[(col, row)] is not None and self.tests[(col, row)]["delta"] > 0
                                    and self.tests[(col, row)]["matched"] and self.p(col, row) < self.alpha
                                    for row in others)

    def verdict(self, col, row) -> str:
        """The rule fixed before the embedded grid's rows were in. The reference's advantage over the row *holds*
        when its Δ is positive in every seed with McNemar's p < alpha in each and the pooled 95 % interval
        excludes 0; it is *reversed* when the same holds the other way; else *unresolved*. *pending* while
        either row lacks a seed the grid expects (`missing`), *not paired* across sample sets."""
        t = self.tests.get((col, row))
        if t is None:
            return ""
        if self._lacking(col, row) or self._lacking(col, self.reference):
            return "pending"
        if not t["by_seed"]:
            return "not paired"
        for sign, word in ((1, "holds"), (-1, "reversed")):
            if (all(sign * d > 0 and p < self.alpha for d, p in t["by_seed"])
                    and sign * t["ci_low"] > 0 and sign * t["ci_high"] > 0):
                return word
        return "unresolved"

    # --- completeness ------------------------------------------------------------------------
    def _expected_seeds(self) -> list[int]:
        if self.expect_seeds is not None:
            return self.expect_seeds
        return sorted({r.seed for (_, row), rs in self.by_cell.items() if row not in SHARED_ROWS for r in rs})

    def _lacking(self, col, row) -> list[int]:
        """The seeds a present row lacks: a method row, those expected; the SFT row, one per sample set of the
        column's methods; the base row (the untrained model) none."""
        have = self.by_cell.get((col, row), [])
        if row == "base" or not have:
            return []
        if row == "sft_pos":
            own = [r for other in self.rows if other not in SHARED_ROWS for r in self.by_cell.get((col, other), [])]
            sets = {r.samples for r in have}
            return sorted({r.seed for r in own if r.samples not in sets})
        return sorted(set(self._expected_seeds()) - {r.seed for r in have})

    def missing(self) -> list[str]:
        """What a partial grid lacks, per column: expected rows with no result, and rows short of seeds (each
        method row: `expect_seeds`, else every seed a method row of any column has; the SFT row: one per
        sample set of the methods; the base and SFT rows are the pipeline's own, never expected by name). Until they arrive the star compares the reference with the rows present."""
        out = []
        for col in self.columns:
            where = f" ({self._title(col)})" if len(self.columns) > 1 else ""
            absent = [row for row in self.expect_rows if row not in SHARED_ROWS and not self.by_cell.get((col, row))]
            if absent:
                out.append(f"no results{where}: " + ", ".join(self.label(row, short=True) for row in absent))
            for row in self.rows:
                if lacking := self._lacking(col, row):
                    seeds_word = "seeds" if len(lacking) > 1 else "seed"
                    out.append(f"{self.label(row, short=True)}{where}: {seeds_word} {', '.join(map(str, lacking))} missing")
        return out

    # --- output ------------------------------------------------------------------------------
    def _header(self) -> list[tuple[str, object]]:
        """(title, column or ('avg', columns)) in display order."""
        out = []
        for data, cols in self.groups:
            out += [(f"{DATA_NAMES.get(data, data)} {MODEL_NAMES.get(m, m)}", (m, d)) for m, d in cols]
            if len(cols) > 1:
                out.append((f"{DATA_NAMES.get(data, data)} Avg.", ("avg", tuple(cols))))
        return out

    def _value(self, spec, row):
        return self.average(spec[1], row) if spec[0] == "avg" else self.cell(spec, row)

    def markdown(self) -> str:
        header = self._header()
        # the most common seed count of the methods (base: one evaluation of the untrained model; SFT: one
        # per sample set, flagged when a sample set of the methods has none)
        own = [row for row in self.rows if row not in SHARED_ROWS] or self.rows
        seeds = [len(c["seeds"]) for col in self.columns for row in own if (c := self.cell(col, row))]
        usual = max(set(seeds), key=lambda k: (seeds.count(k), k))
        sample_sets = {col: len({r.samples for row in own for r in self.by_cell.get((col, row), [])})
                       for col in self.columns}
        lines = ["| " + " | ".join([self._row_title(), *(t for t, _ in header)]) + " |",
                 "|---" * (len(header) + 1) + "|"]
        for row in self.rows:
            cells = []
            for _, spec in header:
                v = self._value(spec, row)
                text = "" if v is None else f"{v['mean']:.1f}" + ("" if v["std"] is None else f" ± {v['std']:.1f}")
                expected = sample_sets.get(spec) if row == "sft_pos" else usual  # one SFT model per sample set
                if v is not None and spec[0] != "avg" and row != "base" and len(v["seeds"]) != expected:
                    text += f" (n={len(v['seeds'])})"
                if v is not None and spec[0] != "avg" and row == self.reference and self.significant(spec):
                    text += "*"
                cells.append(text)
            lines.append("| " + " | ".join([self.label(row), *cells]) + " |")
        test = "paired bootstrap over questions" if self.test == "bootstrap" else "McNemar's exact test"
        missing = self.missing()
        lines += ["", f"Accuracy (%), mean ± sample std over {usual} seed(s) (n=k: k seeds in that cell). "
                  f"\\* {self.label(self.reference, short=True)} is better than every other row of the column "
                  f"with p < {self.alpha:g} ({test})."]
        if missing:
            lines += ["", f"**Partial grid**, not yet its answer: {'; '.join(missing)}. Until they arrive, a cell's mean "
                      f"covers only its seeds present and the star compares {self.label(self.reference, short=True)} "
                      "with the rows present only."]
        return "\n".join(lines) + "\n"

    @staticmethod
    def _title(col) -> str:
        return f"{DATA_NAMES.get(col[1], col[1])} {MODEL_NAMES.get(col[0], col[0])}"

    def _row_title(self) -> str:
        return "Method" if self.rows_key == "method.name" else self.rows_key

    def significance_markdown(self) -> str:
        ref = self.label(self.reference, short=True)
        lines = [f"| column | {ref} vs | Δ (points) | 95 % CI | Δ per seed | p, paired bootstrap | p, McNemar exact "
                 f"(worst seed) | only {ref} right / only other right (that seed) | questions | seeds | {ref}'s advantage |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for (col, row), t in self.tests.items():
            title = self._title(col)
            if t is None:
                lines.append(f"| {title} | {self.label(row)} | no per-question predictions | | | | | | | | |")
                continue
            lines.append(f"| {title} | {self.label(row)} | {t['delta']:+.1f} | "
                         f"[{t['ci_low']:+.1f}, {t['ci_high']:+.1f}] | {', '.join(f'{d:+.1f}' for d in t['per_seed'])} | "
                         f"{t['p_bootstrap']:.4g} | {t['p_mcnemar']:.4g} | "
                         f"{t['ref_only']} / {t['other_only']} | {t['questions']} | {t['seeds']} | {self.verdict(col, row)} |")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["model", "data", self.rows_key, "n_seeds", "seeds", "accuracies", "mean", "std",
                    f"{self.reference}_minus_row", "ci_low", "ci_high", "p_bootstrap", "p_mcnemar", "questions",
                    "tested_on_seeds", "delta_per_seed", "verdict"])
        for title, spec in self._header():
            for row in self.rows:
                v = self._value(spec, row)
                if v is None:
                    continue
                model, data = ("Avg.", spec[1][0][1]) if spec[0] == "avg" else spec
                t = self.tests.get((spec, row)) if spec[0] != "avg" else None
                w.writerow([model, data, row, len(v["seeds"]), ";".join(map(str, v["seeds"])),
                            ";".join(f"{a:.2f}" for a in v["accuracies"]), f"{v['mean']:.2f}",
                            "" if v["std"] is None else f"{v['std']:.2f}",
                            *([""] * 9 if t is None else
                              [f"{t['delta']:.2f}", f"{t['ci_low']:.2f}", f"{t['ci_high']:.2f}",
                               f"{t['p_bootstrap']:.4g}", f"{t['p_mcnemar']:.4g}", t["questions"], t["seeds"].replace(", ", ";"),
                               ";".join(f"{d:.2f}" for d in t["per_seed"]), self.verdict(spec, row)])])
        return buf.getvalue()
