"""The report of `vlmfix compare` (`vlmfix.eval.compare`): report.md, report.json and three plots.

Per cell and metric: the value and its 95 % bootstrap interval over the items (`vlmfix.metrics.stats`,
seeded, `Grid.draws` draws). Per cell against the baseline method set of its model and task, per metric: the
difference with its paired bootstrap interval, and a paired test: McNemar's exact test for a right/wrong
answer (POPE accuracy, AMBER's yes/no questions), the paired bootstrap's p-value otherwise (CHAIR, AMBER's
generative metrics); the p-values of the whole grid are Holm-corrected together. A difference whose interval
holds 0 is reported as "no detectable effect".

The metrics, from each cell's records (item order), as ratios of per-item sums:

- POPE: accuracy over every question and per split (right = the parsed answer equals the label);
- CHAIR: CHAIR_s (captions with a hallucinated object), CHAIR_i (hallucinated mentions / mentions),
  CHAIR_i per 100 words (100 x hallucinated mentions / words: the length-controlled rate), Recall, Len
  (words per caption), each caption cut at the run's max_new_tokens (stated);
- AMBER: CHAIR, Cover, Hal, Cog (`vlmfix.metrics.amber`) and the yes/no accuracy.

The frontier: the cells no other cell of the same model and task beats on both a hallucination rate and a
coverage (CHAIR_i and Recall; AMBER: CHAIR and Cover), i.e. the Pareto set; POPE: accuracy and time per item.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from vlmfix.eval.report_plots import FRONTIER, plot_bars, plot_frontier, plot_speed
from vlmfix.metrics import stats

#: metric -> (better direction: -1 lower is better, +1 higher, 0 neither; paired test; shown in percent)
METRICS: dict[str, tuple[int, str, bool]] = {
    "accuracy": (1, "mcnemar", True),
    "CHAIR_s": (-1, "bootstrap", True), "CHAIR_i": (-1, "bootstrap", True),
    "CHAIR_i per 100 words": (-1, "bootstrap", False), "Recall": (1, "bootstrap", True),
    "Len": (0, "bootstrap", False),
    "CHAIR": (-1, "bootstrap", True), "Cover": (1, "bootstrap", True), "Hal": (-1, "bootstrap", True),
    "Cog": (-1, "bootstrap", True), "yes/no accuracy": (1, "mcnemar", True),
}
NO_EFFECT = "no detectable effect"


# ------------------------------------------------------------------------------- per-item columns


def columns(task: str, records: Sequence[dict], results: Mapping[str, Any], rule: str = "reference"
            ) -> dict[str, tuple[list[float], list[float]]]:
    """{metric: (numerators, denominators)} per item of one cell (see the module docstring)."""
    from vlmfix.metrics.pope import parse_answer

    name = task.partition(":")[0]
    if name == "pope":
        right = [float(parse_answer(r["output"], rule) == r["label"]) for r in records]
        found = {"accuracy": (right, [1.0] * len(right))}
        splits = sorted({r["split"] for r in records})
        if len(splits) > 1:
            for split in splits:
                found[f"accuracy {split}"] = ([x if r["split"] == split else 0.0 for x, r in zip(right, records)],
                                              [float(r["split"] == split) for r in records])
        return found
    if name == "chair":
        rows = results["sentences"]
        hallucinated = [len(s["mscoco_hallucinated_words"]) for s in rows]
        words = [len(s["words"]) for s in rows]
        return {
            "CHAIR_s": ([float(h > 0) for h in hallucinated], [1.0] * len(rows)),
            "CHAIR_i": (hallucinated, [len(s["mscoco_generated_words"]) for s in rows]),
            "CHAIR_i per 100 words": ([100.0 * h for h in hallucinated], words),
            "Recall": ([len(set(s["mscoco_generated_words"]) & set(s["mscoco_gt_words"])) for s in rows],
                       [len(s["mscoco_gt_words"]) for s in rows]),
            "Len": (words, [1.0] * len(rows)),
        }
    from vlmfix.metrics.amber import per_item

    found = {}
    if "generative" in results:
        found.update(per_item(results["generative"]["responses"]))
    disc = [r for r in records if r["type"] != "generative"]
    if disc:
        right = [float(parse_answer(r["output"], rule) == r["truth"]) for r in disc]
        found["yes/no accuracy"] = (right, [1.0] * len(right))
    return found


def _ids_of(task: str, metric: str, records: Sequence[dict]) -> list[str]:
    if task.startswith("amber"):
        wanted = metric != "yes/no accuracy"
        return [r["id"] for r in records if (r["type"] == "generative") == wanted]
    return [r["id"] for r in records]


# ------------------------------------------------------------------------------- the report


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA), {os.cpu_count()} CPU cores"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads " \
           f"{torch.get_num_threads()}"


def _cell_data(outcome: Mapping[str, Any]) -> tuple[list[dict], dict, str]:
    from vlmfix.eval.runner import read_records

    folder = Path(outcome["folder"])
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    spec = outcome["spec"]
    records = read_records(folder / f"{outcome['label']}.jsonl")
    config = results["config"]
    wanted = config.get("items", len(records))
    return records[:wanted], results["results"][spec], config.get("rule", "reference")


def write_report(grid: Any, cells: Sequence[Any], outcomes: Mapping[Any, dict], timing: dict,
                 start: float) -> dict:
    """Score every finished cell, test it against its baseline, and write report.json, report.md and the
    plots into `grid.out`. Returns the report."""
    from vlmfix.eval.runner import versions, write_atomic

    t_report = time.perf_counter()
    baseline = grid.baseline_spec()
    rows: list[dict] = []
    data: dict[int, tuple[list[dict], dict[str, tuple[list[float], list[float]]]]] = {}
    for k, cell in enumerate(cells):
        outcome = outcomes.get(cell, {"status": "failed", "error": "not run"})
        row = {"model": cell.model, "task": cell.task, "method_set": cell.spec, "settings": dict(cell.settings),
               "name": cell.name, "status": outcome["status"], "baseline": cell.spec == baseline}
        if outcome["status"] != "done":
            row["error"] = outcome.get("error", "")
            rows.append(row)
            continue
        try:
            records, results, rule = _cell_data(outcome)
            cols = columns(cell.task, records, results, rule)
        except Exception as err:  # noqa: BLE001 - a cell whose files cannot be scored is a failed cell
            row.update(status="failed", error=f"scoring: {type(err).__name__}: {err}")
            rows.append(row)
            continue
        data[k] = (records, cols)
        row.update({key: outcome.get(key) for key in ("items", "generated", "seconds", "seconds_per_item",
                                                     "max_new_tokens", "tau", "methods", "folder")})
        row["resumed"] = bool(outcome.get("resumed"))
        row["metrics"] = {}
        for metric, (num, den) in cols.items():
            value, low, high = stats.ratio_bootstrap(num, den, draws=grid.draws, seed=0)
            row["metrics"][metric] = {"value": value, "low": low, "high": high, "n": len(num)}
        rows.append(row)
    _paired(grid, cells, rows, data, baseline)
    _frontier(rows)
    report = {
        "vlmfix": versions()["vlmfix"], "versions": versions(), "hardware": _hardware(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commands": _commands(grid.out), "baseline": baseline, "draws": grid.draws, "seed": 0,
        "grid": {"models": grid.models, "tasks": grid.tasks, "method_sets": grid.method_sets,
                 "settings": grid.settings, "sweep": grid.sweep, "tau": grid.tau},
        "cells": rows,
    }
    plots = {"bars": plot_bars(rows, grid.out / "metrics.png"),
             "frontier": plot_frontier(rows, grid.out / "frontier.png"),
             "speed": plot_speed(rows, grid.out / "speed.png")}
    report["plots"] = {k: v.name for k, v in plots.items() if v is not None}
    wall = time.perf_counter() - start
    runs = timing["cells"]
    own = wall - runs - timing["loading"] - timing["tasks"]
    earlier = [o for o in outcomes.values() if o.get("resumed") and isinstance(o.get("seconds"), (int, float))]
    report["timing"] = {"wall_seconds": wall, "model_loading_seconds": timing["loading"],
                        "task_setup_seconds": timing["tasks"], "cells_seconds": runs,
                        "earlier_cells": len(earlier), "earlier_cells_seconds": sum(o["seconds"] for o in earlier),
                        "compare_overhead_seconds": own, "report_seconds": time.perf_counter() - t_report,
                        "overhead_share_of_runs": own / runs if runs else None}
    write_atomic(grid.out / "report.json", json.dumps(report, indent=1, default=str))
    write_atomic(grid.out / "report.md", markdown(report))
    print(f"report: {grid.out / 'report.md'}, {grid.out / 'report.json'}, plots: "
          f"{', '.join(str(grid.out / v) for v in report['plots'].values())}")
    return report


def _commands(out: Path) -> list[str]:
    path = out / "commands.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _paired(grid: Any, cells: Sequence[Any], rows: list[dict], data: Mapping[int, Any], baseline: str) -> None:
    """Each finished cell against its model and task's baseline cell: differences, intervals, tests, Holm."""
    tests: list[dict] = []
    for k, cell in enumerate(cells):
        if k not in data or cell.spec == baseline:
            continue
        base = next((j for j, c in enumerate(cells) if c.spec == baseline and c.model == cell.model
                     and c.task == cell.task and j in data), None)
        if base is None:
            rows[k]["paired_note"] = f"no finished baseline ({baseline}) for this model and task"
            continue
        base_records, base_cols = data[base]
        records, cols = data[k]
        rows[k]["against"] = {}
        for metric, (num, den) in cols.items():
            if metric not in base_cols:
                continue
            ids, base_ids = _ids_of(cell.task, metric, records), _ids_of(cell.task, metric, base_records)
            where = {i: n for n, i in enumerate(base_ids)}
            shared = [n for n, i in enumerate(ids) if i in where]
            bn, bd = base_cols[metric]
            pick = [where[ids[n]] for n in shared]
            a_num, a_den = [bn[j] for j in pick], [bd[j] for j in pick]
            b_num, b_den = [num[n] for n in shared], [den[n] for n in shared]
            test = stats.paired_bootstrap(a_num, a_den, b_num, b_den, draws=grid.draws, seed=0)
            kind = METRICS.get(metric.split(" ")[0] if metric.startswith("accuracy") else metric, (0, "bootstrap", 0))[1]
            entry = {"difference": test["difference"], "low": test["low"], "high": test["high"], "items": len(shared)}
            if kind == "mcnemar":
                right_a = [a_num[n] > 0 for n in range(len(pick)) if a_den[n] > 0]
                right_b = [b_num[n] > 0 for n in range(len(pick)) if b_den[n] > 0]
                mc = stats.mcnemar(right_a, right_b)
                entry.update(test="McNemar exact", table=list(mc["table"]), p=mc["p"])
            else:
                # no draw on the other side: p is below the resolution of the draws, bounded by 1 / draws (Holm's
                # adjusted values are monotone in the p-values, so theirs are bounds too)
                bound = test["p"] == 0
                entry.update(test="paired bootstrap", p=1 / grid.draws if bound else test["p"], p_bound=bound)
            rows[k]["against"][metric] = entry
            tests.append(entry)
    for entry, adjusted in zip(tests, stats.holm([t["p"] for t in tests])):
        entry["p_holm"] = adjusted
        holds_zero = entry["low"] <= 0 <= entry["high"]
        if holds_zero:
            entry["verdict"] = NO_EFFECT
        elif adjusted < 0.05:
            entry["verdict"] = "significant after Holm"
        elif entry.get("p_bound"):  # only a bound on p: Holm cannot decide at this number of draws
            entry["verdict"] = "interval excludes 0, too few draws to decide after Holm (raise --draws)"
        else:
            entry["verdict"] = "interval excludes 0, not significant after Holm"


def _direction(metric: str) -> int:
    return METRICS.get("accuracy" if metric.startswith("accuracy") else metric, (0, "", False))[0]


def _frontier(rows: list[dict]) -> None:
    """Mark `frontier: True` on the Pareto-optimal finished cells of each model and task."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault((row["model"], row["task"]), []).append(row)
    for (_, task), group in groups.items():
        name = task.partition(":")[0]
        if name in FRONTIER:
            rate, cover = FRONTIER[name]
            points = [(r["metrics"][rate]["value"], -r["metrics"][cover]["value"]) for r in group]
        else:
            points = [(-r["metrics"]["accuracy"]["value"], r.get("seconds_per_item") or float("inf")) for r in group]
        for r, p in zip(group, points):
            r["frontier"] = not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)


def _shown(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    percent = METRICS.get("accuracy" if metric.startswith("accuracy") else metric, (0, "", True))[2]
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def markdown(report: Mapping[str, Any]) -> str:
    """report.md: what ran, a table per model and task (value [95 % interval]), the paired tests, the failures."""
    rows = report["cells"]
    timing = report["timing"]
    lines = ["# vlmfix compare", "",
             f"- vlmfix {report['vlmfix']}; {report['hardware']}; {report['date']}",
             "- commands: " + "; ".join(f"`{c}`" for c in report["commands"][-5:]),
             f"- baseline method set: `{report['baseline']}`; intervals: 95 % percentile bootstrap over the items "
             f"({report['draws']} draws, seed {report['seed']}); paired tests: McNemar's exact test (right/wrong "
             "answers), paired bootstrap (rates), Holm-corrected over the whole grid",
             f"- wall time {timing['wall_seconds']:.1f} s: model loading {timing['model_loading_seconds']:.1f} s, "
             f"task data {timing['task_setup_seconds']:.1f} s, the cells' runs {timing['cells_seconds']:.1f} s, compare itself {timing['compare_overhead_seconds']:.2f} s"
             + (f" ({100 * timing['overhead_share_of_runs']:.2f} % of the runs)"
                if timing["overhead_share_of_runs"] is not None else "")
             + (f"; {timing['earlier_cells']} cells were finished by earlier invocations (their runs took "
                f"{timing['earlier_cells_seconds']:.1f} s then)" if timing.get("earlier_cells") else ""),
             "- *: on the frontier (no other cell of the model and task is better on both the hallucination rate "
             "and the coverage; POPE: accuracy and time per item)", ""]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task"]), []).append(row)
    for (model, task), group in groups.items():
        done = [r for r in group if r["status"] == "done"]
        metrics = list(dict.fromkeys(m for r in done for m in r["metrics"]))
        tokens = sorted({r["max_new_tokens"] for r in done})
        lines += [f"## {task} on {model}" + (f" (max_new_tokens {', '.join(map(str, tokens))})" if tokens else ""), ""]
        if done:
            lines += ["| method set | " + " | ".join(metrics) + " | items | s / item | speed vs baseline |",
                      "|---|" + "---:|" * (len(metrics) + 3)]
            base = next((r for r in done if r["baseline"]), None)
            for r in done:
                cells = [f"{_shown(m, r['metrics'][m]['value'])} [{_shown(m, r['metrics'][m]['low'])}, "
                         f"{_shown(m, r['metrics'][m]['high'])}]" if m in r["metrics"] else "-" for m in metrics]
                spi = r.get("seconds_per_item")
                ratio = spi / base["seconds_per_item"] if spi and base and base.get("seconds_per_item") else None
                lines.append(f"| {'*' if r.get('frontier') else ''}{r['name']}"
                             f"{' (baseline)' if r['baseline'] else ''} | " + " | ".join(cells) +
                             f" | {r['items']} | {'-' if spi is None else f'{spi:.3f}'} | "
                             f"{'-' if ratio is None else f'{ratio:.2f}x'} |")
            tests = [(r, m, t) for r in done for m, t in r.get("against", {}).items()]
            if tests:
                lines += ["", f"Against `{report['baseline']}` (difference in points; 95 % paired interval; p raw / "
                          "Holm):", "",
                          "| method set | metric | difference | interval | test | p | p (Holm) | verdict |",
                          "|---|---|---:|---:|---|---:|---:|---|"]
                for r, m, t in tests:
                    scale = 100 if METRICS.get("accuracy" if m.startswith("accuracy") else m, (0, "", True))[2] else 1
                    arrow = ""
                    if t["verdict"] != NO_EFFECT and _direction(m):
                        arrow = " (better)" if t["difference"] * _direction(m) > 0 else " (worse)"
                    lines.append(f"| {r['name']} | {m} | {scale * t['difference']:+.2f} | [{scale * t['low']:+.2f}, "
                                 f"{scale * t['high']:+.2f}] | {t['test']} | {'< ' * bool(t.get('p_bound'))}{t['p']:.3g} | "
                                 f"{'< ' * bool(t.get('p_bound'))}{t['p_holm']:.3g} | "
                                 f"{t['verdict']}{arrow} |")
            for r in done:
                if r.get("paired_note"):
                    lines.append(f"\n{r['name']}: {r['paired_note']}")
        failed = [r for r in group if r["status"] != "done"]
        if failed:
            lines += ["", "Failed cells (the others ran):", ""] + [f"- {r['name']}: {r['error']}" for r in failed]
        lines.append("")
    lines += ["## Each cell's settings", ""]
    for r in rows:
        if r["status"] == "done":
            params = "; ".join(f"{m['class']} {json.dumps(m['params'], default=str)}" for m in r["methods"]) or \
                "plain model"
            lines.append(f"- {r['model']} / {r['task']} / `{r['name']}`: {params}; max_new_tokens "
                         f"{r['max_new_tokens']}" + (f"; tau {r['tau']}" if r.get("tau") is not None else "") +
                         f"; results in `{r['folder']}`")
    plots = report.get("plots", {})
    if plots:
        lines += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    return "\n".join(lines) + "\n"
