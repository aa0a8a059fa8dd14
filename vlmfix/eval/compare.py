"""`vlmfix compare`: a grid of method sets x settings x tasks x models, each cell a resumable run of the
evaluation runner, and one report with intervals and paired tests against a baseline method set.

A grid (`Grid`, from flags or one YAML file, `load_grid`):

- `method_sets`: specs as everywhere ("none", "var", "var,gift", "fastv:keep64"; `vlmfix.methods`);
- `settings`: fixed method parameters ("var.p=0.4"), and `sweep`: {"var.p": [0.2, 0.4], "tau": [15, 20]}. A
  method set runs once per combination of the sweep keys that concern it (its methods' parameters, and tau
  when it has a method), so "none" runs once however large the sweep;
- `tasks`: "pope" (its three splits), "pope:random" (one split), "chair", "amber" (`vlmfix.eval.tasks`), each
  with its YAML defaults (configs/evals/<task>.yaml) under the grid's overrides (`data`, `limit`,
  `n_images`, `max_new_tokens`, ...: one fixed max_new_tokens per task, stated in the report);
- `models`: names or paths as `--model` takes them.

Each cell is `evaluate()` on one method set with its own output folder `<out>/<model>/<task>/<cell>/` (the
runner's layout: `<label>.jsonl`, `<label>.config.json`, results.md / results.json, the data fingerprint of
every record), so a killed grid resumes where it stopped: a finished cell (its `cell.json`) is checked
against its data (`prepare`: same config, same fingerprints) and not run again, an unfinished one resumes its
items. A cell that fails is recorded with its error and the others go on. With `accelerate launch`, every
cell is sharded over the processes; the main process writes the report.

The report (`vlmfix.eval.report`): report.md, report.json and the plots.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


#: tasks a grid can hold (a POPE split as "pope:SPLIT")
TASK_NAMES = ("pope", "chair", "amber")
#: grid keys passed to every task's config (each task keeps those it knows)
TASK_OVERRIDES = ("dtype", "data", "world_images", "batch_size", "seed", "prep_workers", "limit", "n_images",
                  "image_ids", "rule", "prompt", "question_prompt")
GRID_KEYS = ("models", "tasks", "methods", "settings", "sweep", "tau", "baseline", "max_new_tokens", "draws", "out",
             "restart",
             *TASK_OVERRIDES)
CELL_FILE = "cell.json"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a model, a task, a method set and the settings that concern it."""

    model: str
    task: str
    spec: str
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """"var,gift" or "var,gift [var.p=0.4 tau=15]"."""
        shown = " ".join(f"{k}={v}" for k, v in self.settings)
        return f"{self.spec} [{shown}]" if shown else self.spec

    @property
    def folder(self) -> str:
        label = self.spec.replace(",", "+").replace(":", "@")
        return label + "".join(f"__{k}={v}" for k, v in self.settings).replace("/", "_").replace(" ", "")

    def method_settings(self) -> dict[str, dict[str, Any]]:
        """{method name: {parameter: value}} of the cell's settings (tau under "")."""
        found: dict[str, dict[str, Any]] = {}
        for key, value in self.settings:
            name, _, param = key.rpartition(".")
            found.setdefault(name, {})[param] = value
        return found


@dataclass
class Grid:
    """What `vlmfix compare` runs (see the module docstring)."""

    models: list[str]
    tasks: list[str]
    method_sets: list[str]
    settings: list[str] = field(default_factory=list)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    tau: Any = None
    baseline: str | None = None
    max_new_tokens: int | None = None
    draws: int = 2000
    out: Path = Path("out/compare")
    restart: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        """Every cell: models x tasks x method sets x the sweep combinations that concern each set."""
        from vlmfix.methods import normal_spec, parse_methods, parse_settings, with_settings

        fixed = {f"{name}.{param}" if name else param: value for name, params in parse_settings(self.settings).items()
                 for param, value in params.items()}
        if self.tau is not None:
            if "tau" in fixed:
                raise ValueError("tau is given twice (--tau and a tau=VALUE setting); give one")
            fixed["tau"] = self.tau
        cells = []
        for model, task in itertools.product(self.models, self.tasks):
            for spec in map(normal_spec, self.method_sets):
                names = {m.name for m in parse_methods(spec)}

                def concerns(key: str) -> bool:
                    return (key == "tau" and bool(names)) or key.rpartition(".")[0] in names

                kept = tuple((k, v) for k, v in fixed.items() if concerns(k) and k not in self.sweep)
                keys = [k for k in self.sweep if concerns(k)]
                for values in itertools.product(*(self.sweep[k] for k in keys)):
                    cell = Cell(model, task, spec, kept + tuple(zip(keys, values)))
                    with_settings(parse_methods(spec), cell.method_settings())  # each value validates here
                    cells.append(cell)
        return cells

    def baseline_spec(self) -> str:
        from vlmfix.methods import normal_spec

        specs = [normal_spec(s) for s in self.method_sets]
        if self.baseline is None:
            return "none" if "none" in specs else specs[0]
        if normal_spec(self.baseline) not in specs:
            raise ValueError(f"the baseline {self.baseline!r} is not one of the grid's method sets ({', '.join(specs)})")
        return normal_spec(self.baseline)


# ------------------------------------------------------------------------------- building a grid


def parse_sweep(texts: Sequence[str]) -> dict[str, list[Any]]:
    """["var.p=0.2,0.4", "tau=15,20"] -> {"var.p": [0.2, 0.4], "tau": [15, 20]} (each key checked against the
    registry: an unknown method or parameter is an error that lists what exists)."""
    from vlmfix.methods.registry import parse_setting, parse_value

    sweep: dict[str, list[Any]] = {}
    for text in texts:
        name, param, values = parse_setting(text)
        key = f"{name}.{param}" if name else param
        if key in sweep:
            raise ValueError(f"sweep {text!r}: {key} is swept twice; list its values once (e.g. {key}=1,2,3)")
        parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
        if len(set(map(repr, parsed))) != len(parsed):
            raise ValueError(f"sweep {text!r}: a value is listed twice")
        sweep[key] = parsed
    return sweep


def load_grid(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Grid:
    """A grid from a YAML file (keys of `GRID_KEYS`; `sweep` as {"var.p": [0.2, 0.4]} or ["var.p=0.2,0.4"])
    with `overrides` (flags; None values ignored) over it."""
    config: dict[str, Any] = {}
    if path is not None:
        from vlmfix.eval.tasks import read_yaml_mapping

        config = read_yaml_mapping(Path(path), "grid", GRID_KEYS)
    config.update({k: v for k, v in (overrides or {}).items() if v is not None})
    sweep = config.get("sweep") or {}
    if isinstance(sweep, dict):
        sweep = parse_sweep([f"{k}={','.join(map(str, v if isinstance(v, list) else [v]))}" for k, v in sweep.items()])
    else:
        sweep = parse_sweep(list(sweep))
    as_list = {k: [config[k]] if isinstance(config.get(k), str) else list(config.get(k) or [])
               for k in ("models", "tasks", "methods", "settings")}
    for key, default in (("models", ["demo"]), ("methods", ["none", "var", "gift"])):
        as_list[key] = as_list[key] or default
    if not as_list["tasks"]:
        raise ValueError("no tasks: give --tasks (pope, pope:SPLIT, chair, amber)")
    for task in as_list["tasks"]:
        check_task(task)
    grid = Grid(models=as_list["models"], tasks=as_list["tasks"], method_sets=as_list["methods"],
                settings=as_list["settings"], sweep=sweep, tau=config.get("tau"), baseline=config.get("baseline"),
                max_new_tokens=config.get("max_new_tokens"), draws=int(config.get("draws", 2000)),
                out=Path(config.get("out") or "out/compare"), restart=bool(config.get("restart")),
                overrides={k: config[k] for k in TASK_OVERRIDES if config.get(k) is not None})
    if grid.draws < 1000:
        raise ValueError(f"draws must be >= 1000 for a 95 % bootstrap interval, got {grid.draws}")
    grid.baseline_spec()
    cells = grid.cells()
    if len({(c.model, c.task, c.folder) for c in cells}) != len(cells):
        raise ValueError("a method set is given twice")
    return grid


def check_task(task: str) -> None:
    from vlmfix.data.pope import SPLITS

    name, _, split = task.partition(":")
    if name not in TASK_NAMES or (split and (name != "pope" or split not in SPLITS)):
        raise ValueError(f"unknown task {task!r}; available: pope, {', '.join(f'pope:{s}' for s in SPLITS)}, chair, "
                         "amber (lmms-eval tasks run through `lmms_eval --model vlmfix`, docs/lmms_eval.md)")


def task_config(grid: Grid, task: str, model: str) -> dict:
    """The `vlmfix.eval.tasks` config of one task of the grid."""
    from vlmfix.eval.tasks import COMMON_KEYS, DATA_KEYS, TASK_KEYS, load_config

    name, _, split = task.partition(":")
    known = set(COMMON_KEYS + TASK_KEYS[name])
    given = {k: v for k, v in grid.overrides.items() if k in known and k != "data"}
    data = grid.overrides.get("data") or {}
    given.update({k: v for k, v in data.items() if k in DATA_KEYS[name]})
    if split:
        given["splits"] = [split]
    if grid.max_new_tokens is not None and name in ("chair", "amber"):
        given["max_new_tokens"] = grid.max_new_tokens
    return load_config(name, None, {**given, "model": model, "methods": ["none"], "out": str(grid.out)})


# ------------------------------------------------------------------------------- running


def _cell_dir(grid: Grid, cell: Cell) -> Path:
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", cell.model.replace("/", "--")).strip("_")
    return grid.out / model / cell.task.replace(":", "-") / cell.folder


def run_grid(grid: Grid, command: str = "vlmfix compare", loader: Any = None) -> dict | None:
    """Run every cell (resuming finished and unfinished ones), then write the report (main process).
    `loader(model_name, dtype) -> (model, processor)` replaces `vlmfix.loading.load` (a model already loaded,
    tests). Returns the report on the main process, else None."""
    import torch
    from tqdm.auto import tqdm

    from vlmfix.eval import report as reporting
    from vlmfix.eval.runner import accelerator

    start = time.perf_counter()
    acc = accelerator()
    cells = grid.cells()
    grid.out.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        if grid.restart:  # the grid's own cells only: nothing else in --out is touched
            for cell in cells:
                shutil.rmtree(_cell_dir(grid, cell), ignore_errors=True)
        with open(grid.out / "commands.txt", "a", encoding="utf-8") as f:
            f.write(command + "\n")
    outcomes: dict[Cell, dict] = {}
    timing = {"loading": 0.0, "tasks": 0.0, "cells": 0.0}
    bar = tqdm(total=len(cells), desc="grid", unit="cell", position=0, dynamic_ncols=True,
               **({} if acc.is_main_process else {"disable": True}))  # TQDM_DISABLE=1 still silences it
    for model_name in grid.models:
        mine = [c for c in cells if c.model == model_name]
        loaded, failure = None, None
        for task in grid.tasks:
            todo = [c for c in mine if c.task == task]
            t0 = time.perf_counter()
            try:
                built, config = _build_task(grid, task, model_name)
            except Exception as err:  # noqa: BLE001 - a task that cannot be built fails its cells, not the grid
                for cell in todo:
                    outcomes[cell] = _failed(cell, err)
                    bar.update(1)
                continue
            finally:
                timing["tasks"] += time.perf_counter() - t0
            for cell in todo:
                acc.wait_for_everyone()
                if failure is not None:
                    outcomes[cell] = _failed(cell, failure)
                    bar.update(1)
                    continue
                try:
                    settings, msets, prints = _prepare_cell(grid, cell, built, config)
                    folder = _cell_dir(grid, cell)
                    done = folder / CELL_FILE
                    if done.is_file():
                        outcomes[cell] = {**json.loads(done.read_text(encoding="utf-8")), "resumed": True}
                        bar.update(1)
                        continue
                    if loaded is None:
                        t0 = time.perf_counter()
                        try:
                            loaded = (loader or _load)(model_name, config["dtype"])
                        except Exception as err:  # noqa: BLE001
                            failure = err
                            raise
                        finally:
                            timing["loading"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    outcomes[cell] = _run_cell(cell, built, loaded, msets, settings, prints, folder)
                    timing["cells"] += time.perf_counter() - t0
                except Exception as err:  # noqa: BLE001 - recorded in the report; the grid goes on
                    outcomes[cell] = _failed(cell, err)
                    print(f"vlmfix compare: cell {cell.model} / {cell.task} / {cell.name} failed: {err}",
                          file=sys.stderr, flush=True)
                bar.update(1)
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    timing["total_before_report"] = time.perf_counter() - start
    return reporting.write_report(grid, cells, outcomes, timing, start)


def _load(model_name: str, dtype: str) -> tuple[Any, Any]:
    import torch

    from vlmfix.loading import load, require_vlm

    model, processor = load(model_name, getattr(torch, dtype))
    require_vlm(processor, model_name, "compare")
    return model, processor


def _build_task(grid: Grid, task: str, model_name: str) -> tuple[Any, dict]:
    from vlmfix.eval.tasks import TASK_BUILDERS, resolve_data

    config = task_config(grid, task, model_name)
    name = task.partition(":")[0]
    built = TASK_BUILDERS[name](config, resolve_data(name, config))
    return built, config


def _prepare_cell(grid: Grid, cell: Cell, built: Any, config: dict) -> tuple[Any, list, dict]:
    from vlmfix.eval.runner import Settings, parse_method_sets, prepare

    settings_map = cell.method_settings()
    tau = settings_map.pop("", {}).get("tau")
    msets = parse_method_sets([cell.spec], settings_map)
    settings = Settings(model=cell.model, out=_cell_dir(grid, cell), dtype=config["dtype"],
                        batch_size=config["batch_size"], max_new_tokens=config["max_new_tokens"], seed=config["seed"],
                        prep_workers=config["prep_workers"], tau=tau, progress_row=1)
    return settings, msets, prepare(built, msets, settings)


def _run_cell(cell: Cell, built: Any, loaded: tuple, msets: list, settings: Any, prints: dict, folder: Path) -> dict:
    from vlmfix.eval.runner import done_ids, evaluate, write_atomic

    before = len(done_ids(folder, msets[0].label) & set(prints))
    t0 = time.perf_counter()
    results = evaluate(built, loaded[0], loaded[1], msets, settings, prints)
    seconds = time.perf_counter() - t0
    if results is None:  # another process of a group: the main one records the cell
        return {"status": "done"}
    generated = len(built.items) - before
    outcome = {"status": "done", "model": cell.model, "task": cell.task, "spec": cell.spec,
               "settings": dict(cell.settings), "folder": str(folder), "label": msets[0].label,
               "items": len(built.items), "generated": generated, "seconds": seconds,
               "seconds_per_item": seconds / generated if generated else None,
               "max_new_tokens": settings.max_new_tokens, "tau": settings.tau,
               "methods": results["config"]["method_sets"][cell.spec]["methods"]}
    write_atomic(folder / CELL_FILE, json.dumps(outcome, indent=1, default=str))
    return outcome


def _failed(cell: Cell, err: BaseException) -> dict:
    said = "".join(traceback.format_exception_only(type(err), err)).strip()
    return {"status": "failed", "model": cell.model, "task": cell.task, "spec": cell.spec,
            "settings": dict(cell.settings), "error": said}
