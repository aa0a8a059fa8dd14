"""`vlmfix compare`: method sets x settings x tasks x models in one resumable command, and a report with
intervals and paired tests (`vlmfix.eval.compare`, `vlmfix.eval.report`; docs/evaluation.md, "Compare")."""

from __future__ import annotations

import argparse
import shlex
import sys

from vlmfix.cli.flags import RESUME, add_methods, add_n_images, add_out, add_parser, add_restart
from vlmfix.loading import DTYPES


def grid_overrides(args: argparse.Namespace) -> dict:
    """The flags as `load_grid` overrides (None: not given)."""
    data = {k: v for k, v in (("world", args.world), ("images", args.images), ("amber_dir", args.amber_dir)) if v}
    return {"models": args.models, "tasks": args.tasks, "methods": args.methods, "settings": args.settings,
            "sweep": args.sweep, "tau": args.tau, "baseline": args.baseline, "max_new_tokens": args.max_new_tokens,
            "draws": args.draws, "out": args.out, "dtype": args.dtype, "data": data or None,
            "world_images": args.world_images, "batch_size": args.batch_size, "seed": args.seed,
            "limit": args.limit, "n_images": args.n_images, "prep_workers": args.prep_workers,
            "restart": args.restart or None}


def cmd_compare(args: argparse.Namespace) -> int:
    from vlmfix.eval.compare import load_grid, run_grid

    grid = load_grid(args.config, grid_overrides(args))
    cells = grid.cells()
    print(f"vlmfix compare: {len(cells)} cells ({len(grid.models)} model(s) x {len(grid.tasks)} task(s) x "
          f"{len(cells) // max(1, len(grid.models) * len(grid.tasks))} method set(s) and settings) -> {grid.out}",
          file=sys.stderr, flush=True)
    report = run_grid(grid, command=shlex.join(["vlmfix", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"]
                      else "vlmfix compare (called from Python)")
    failed = [c for c in (report or {}).get("cells", []) if c["status"] != "done"]
    if failed:
        print(f"vlmfix compare: {len(failed)} of {len(report['cells'])} cells failed (their errors are in "
              f"{grid.out / 'report.md'}); rerun to retry them, finished cells are kept", file=sys.stderr)
        return 1
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `compare` command on the CLI's subparsers."""
    p = add_parser(sub, "compare", "a grid of method sets x settings x tasks x models, one report with intervals",
                   description="Run a grid (method sets x settings x tasks x models), each cell a resumable "
                   "evaluation, and write report.md, report.json and plots: 95 % bootstrap intervals, paired tests "
                   "against the baseline set (McNemar, paired bootstrap) with Holm correction, the frontier. Flags "
                   "override the YAML file of --config.")
    p.add_argument("--config", metavar="FILE", help="a YAML grid (keys: models, tasks, methods, settings, sweep, "
                   "tau, baseline, max_new_tokens, data, limit, n_images, ...)")
    p.add_argument("--models", nargs="+", metavar="NAME|PATH", help="VLMs (default: demo)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="pope, pope:random|popular|adversarial, chair, amber")
    add_methods(p, None, "method sets, each a column of the grid (default: none var gift)")
    p.add_argument("--set", dest="settings", nargs="+", metavar="NAME.PARAM=VALUE",
                   help="fixed method parameters for every cell holding the method, e.g. var.p=0.4")
    p.add_argument("--sweep", nargs="+", metavar="NAME.PARAM=V1,V2",
                   help="parameters to sweep, e.g. var.p=0.2,0.4,0.6 gift.alpha=1,3,5 tau=15,20: each method set "
                   "runs every combination of the keys of its methods")
    p.add_argument("--tau", help="sink threshold (default: the model preset, else 'scaled')")
    p.add_argument("--baseline", metavar="SET", help="the method set every cell is tested against (default: none "
                   "when in the grid, else the first)")
    p.add_argument("--data", dest="world", metavar="DIR", help="an EmojiCOCO folder for every task (see --world-images)")
    p.add_argument("--world-images", type=int, metavar="N", help="generate --data with N images when it does not exist")
    p.add_argument("--image-dir", dest="images", metavar="DIR", help="images of a real dataset (with --amber-dir)")
    p.add_argument("--amber-dir", metavar="DIR", help="the AMBER benchmark's data/ folder")
    p.add_argument("--limit", type=int, metavar="N", help="POPE: the first N questions per split; AMBER: the first N "
                   "queries of each kind")
    add_n_images(p, None, "CHAIR: images to caption (default: all, at most 500)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="caption length of chair and amber, fixed for "
                   "every cell (default: the task config's, 128)")
    p.add_argument("--dtype", choices=DTYPES, help="weights' dtype (default: float32)")
    p.add_argument("--batch-size", type=int, metavar="N", help="prompts per batch (default: 8)")
    p.add_argument("--seed", type=int, help="seed of the image draw and of a generated world (default: 0)")
    p.add_argument("--prep-workers", type=int, metavar="N", help="CPU threads preparing the next batches")
    p.add_argument("--draws", type=int, metavar="N", help="bootstrap draws (default: 2000, at least 1000)")
    add_out(p, None, "output folder: one sub-folder per cell, report.md, report.json, the plots "
            "(default: out/compare)")
    add_restart(p)
    p.set_defaults(func=cmd_compare, resume=RESUME)
