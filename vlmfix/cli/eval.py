"""`vlmfix eval pope|chair`: the flags of the tasks in `vlmfix.eval.tasks` (which also says how the
configuration layers: configs/evals/<task>.yaml, then `--config`, then the flags)."""

from __future__ import annotations

import argparse

from vlmfix.cli.flags import (RESUME, add_methods, add_model, add_n_images, add_out, add_parser, add_restart, add_settings,
                              deprecated)
from vlmfix.eval.tasks import CHAIR_SAMPLE, COMMON_KEYS, DATA_KEYS, TASK_KEYS, TASKS, load_config, run
from vlmfix.loading import DTYPES


def cmd_eval(args: argparse.Namespace) -> int:
    keys = COMMON_KEYS + TASK_KEYS[args.task] + DATA_KEYS[args.task]
    overrides = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    run(args.task, load_config(args.task, args.config, overrides), restart=args.restart)
    return 0


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `eval` command on the CLI's subparsers."""
    from vlmfix.data.pope import SPLITS
    from vlmfix.metrics.pope import RULES

    parser = add_parser(sub, "eval", "POPE / CHAIR / AMBER evaluation (resumable; sharded with accelerate launch)",
                        description="POPE / CHAIR / AMBER evaluation. Flags override the YAML config "
                        "(configs/evals/<task>.yaml, then --config); a flag left out keeps the config's value.")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    helps = {"pope": "POPE yes/no object questions (accuracy, precision, recall, F1, yes-ratio)",
             "chair": "CHAIR on detailed captions (CHAIR_s, CHAIR_i, Recall, Len)",
             "amber": "AMBER: captions (CHAIR, Cover, Hal, Cog) and yes/no questions (accuracy, F1)"}
    for task in TASKS:
        p = add_parser(tasks, task, helps[task])
        p.add_argument("--config", metavar="FILE", help=f"YAML layered over configs/evals/{task}.yaml")
        add_model(p, default=None, what="the VLM (config default: demo)")
        p.add_argument("--dtype", choices=DTYPES, help="weights' dtype (config default: float32)")
        p.add_argument("--data", dest="world", metavar="DIR", help="an EmojiCOCO folder (see --world-images)")
        p.add_argument("--world-images", type=int, metavar="N",
                       help="generate --data with N images when it does not exist")
        p.add_argument("--image-dir", dest="images", metavar="DIR",
                       help="image folder of a real dataset (e.g. COCO val2014)")
        deprecated(p, "--images", "--image-dir", "images")
        if task == "pope":
            p.add_argument("--pope-dir", metavar="DIR",
                           help="folder with the official coco_pope_{random,popular,adversarial}.json")
            p.add_argument("--pope-hf", metavar="DIR", help="local copy of lmms-lab/POPE (parquet)")
            p.add_argument("--splits", nargs="+", choices=SPLITS, help="POPE splits (config default: all three)")
            p.add_argument("--limit", type=int, metavar="N",
                           help="the first N questions of each split (config default: all); more than a split "
                           "holds is an error")
            p.add_argument("--rule", choices=tuple(RULES), help="answer parsing rule (config default: reference)")
        elif task == "amber":
            p.add_argument("--amber-dir", metavar="DIR", help="the benchmark's data/ folder (annotations.json, "
                           "relation.json, safe_words.txt, query/query_all.json); with --image-dir")
            p.add_argument("--limit", type=int, metavar="N", help="the first N queries of each kind (generative, "
                           "discriminative; config default: all)")
            p.add_argument("--rule", choices=tuple(RULES), help="yes/no parsing rule (config default: reference)")
            p.add_argument("--question-prompt", help="the text of a yes/no question ({query} is replaced)")
        else:
            p.add_argument("--instances", nargs="+", metavar="FILE",
                           help="COCO instances file(s); images are drawn from the first")
            p.add_argument("--captions", nargs="+", metavar="FILE", help="COCO captions file(s)")
            add_n_images(p, None, f"images to caption, drawn with --seed (config default: all, at most {CHAIR_SAMPLE})")
            p.add_argument("--image-ids", metavar="FILE",
                           help="JSON file of image ids to caption (e.g. a saved chair_image_ids.json)")
        add_methods(p, None, "method sets, each evaluated on its own (config default: none var gift)")
        add_settings(p)
        p.add_argument("--batch-size", type=int, metavar="N", help="prompts per batch (config default: 8)")
        p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate per answer or caption")
        p.add_argument("--prompt", help="the user's text" + {"pope": " ({question} is replaced)",
                                                               "amber": " ({query} is replaced)"}.get(task, ""))
        p.add_argument("--seed", type=int, help="seed of the image draw and of a generated world (config default: 0)")
        p.add_argument("--prep-workers", type=int, metavar="N",
                       help="CPU threads preparing the next batches (default: 0 on CPU, up to 8 with a GPU)")
        add_out(p, None, f"output folder: JSONL per method set, results.md, results.json (config default: "
                f"out/eval/{task})")
        add_restart(p)
        p.set_defaults(func=cmd_eval, resume=RESUME)
