"""POPE in the layout of the Hugging Face dataset `lmms-lab/POPE`, written locally, and an lmms-eval
task file that runs lmms-eval's own POPE task on it offline.

`write_pope_dataset(out, images, pope_dir)` reads the official POPE question files
(`coco_pope_{split}.json`, as `vlmfix world` writes them for an EmojiCOCO folder) and their images
and writes `out/data/test-00000-of-00001.parquet`: the default config of `lmms-lab/POPE`, one
split "test", one row per question with the columns

    id            running row number, as text ("0", "1", ...)
    question_id   the question's id in its file, as text (ids repeat across splits, as upstream)
    question      "Is there a dog in the image?"
    answer        "yes" | "no"
    image_source  the image file's name without its extension
    image         the image file's bytes (a `datasets.Image` feature)
    category      the POPE split: "random" | "popular" | "adversarial"

`datasets.load_dataset(out)` reads it as a DatasetDict with a "test" split, as lmms-eval reads the
hub copy, and `vlmfix.data.pope.load_pope_hf(out, split)` reads the questions back.

`write_pope_task(folder, dataset)` writes `folder/<task>.yaml`: `include:` lmms-eval's installed
`tasks/pope/pope.yaml` (its prompt, generation settings and scoring code, unmodified) with the
dataset replaced by the local folder. Run it with `lmms-eval --include_path folder --tasks <task>`.

    python -m vlmfix.integrations.pope_hf --world out/emojicoco --world-images 20 --out out/lmms-pope
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from vlmfix.data.errors import DataFormatError
from vlmfix.data.pope import SPLITS, check_splits, load_pope_jsonl, pope_file

COLUMNS = ("id", "question_id", "question", "answer", "image_source", "image", "category")
PARQUET = Path("data") / "test-00000-of-00001.parquet"
TASK = "pope_local"


def write_pope_dataset(out: str | Path, images: str | Path, pope_dir: str | Path,
                       splits: Sequence[str] = SPLITS, limit: int | None = None) -> Path:
    """Write the questions of `splits` (the first `limit` of each, all when None) from
    `pope_dir/coco_pope_{split}.json` with their images from `images` as `out/data/test-*.parquet`
    (see the module docstring); returns the parquet file. Missing files or images and a `limit`
    beyond a split's questions raise, naming them."""
    import datasets

    check_splits(splits)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all questions), got {limit}")
    images = Path(images)
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for split in splits:
        path = pope_file(pope_dir, split)
        questions = load_pope_jsonl(path)
        if limit is not None and limit > len(questions):
            raise ValueError(f"limit is {limit} but {path} has {len(questions)} questions")
        for q in questions[:limit]:
            image = images / q.image
            if not image.is_file():
                raise DataFormatError(f"{path}: question_id {q.question_id}: image {q.image!r} not found in {images}")
            values = (str(len(rows["id"])), str(q.question_id), q.text, q.label, Path(q.image).stem,
                      {"bytes": image.read_bytes(), "path": q.image}, split)
            for column, value in zip(COLUMNS, values):
                rows[column].append(value)
    features = datasets.Features({c: datasets.Image() if c == "image" else datasets.Value("string") for c in COLUMNS})
    target = Path(out) / PARQUET
    target.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(target))
    return target


def lmms_eval_pope_yaml() -> Path:
    """lmms-eval's installed POPE task file (found without importing lmms-eval)."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lmms-eval is not installed: run `make lmms-eval` (see docs/lmms_eval.md)")
    path = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "pope" / "pope.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: this lmms-eval has no POPE task file")
    return path


def write_pope_task(folder: str | Path, dataset: str | Path, task: str = TASK) -> Path:
    """Write `folder/<task>.yaml`: lmms-eval's POPE task on the local dataset folder `dataset`
    (the layout of `write_pope_dataset`); returns the file."""
    import yaml

    dataset = Path(dataset).resolve()
    if not (dataset / PARQUET).is_file():
        raise FileNotFoundError(f"{dataset / PARQUET}: not a POPE folder written by write_pope_dataset")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"include": str(lmms_eval_pope_yaml()), "task": task, "dataset_path": str(dataset),
              "dataset_kwargs": {}}
    path = folder / f"{task}.yaml"
    path.write_text("# lmms-eval's POPE task (prompt, generation settings, scoring) on a local copy in the layout\n"
                    "# of lmms-lab/POPE, written by vlmfix.integrations.pope_hf; nothing is downloaded.\n"
                    + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlmfix.integrations.pope_hf`: an EmojiCOCO folder (generated when missing and
    --world-images is given) or official POPE files -> the dataset and its task file in --out."""
    parser = argparse.ArgumentParser(prog="python -m vlmfix.integrations.pope_hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", metavar="DIR", help="an EmojiCOCO folder (`vlmfix world`)")
    parser.add_argument("--world-images", type=int, metavar="N", help="generate --world with N images when missing")
    parser.add_argument("--seed", type=int, default=0, help="seed of a generated world (default: 0)")
    parser.add_argument("--image-dir", metavar="DIR", help="images of official POPE files (e.g. COCO val2014)")
    parser.add_argument("--pope-dir", metavar="DIR", help="folder of the official coco_pope_{split}.json")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS))
    parser.add_argument("--limit", type=int, metavar="N", help="the first N questions of each split (default: all)")
    parser.add_argument("--task", default=TASK, help=f"lmms-eval task name (default: {TASK})")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the dataset and <task>.yaml")
    args = parser.parse_args(argv)
    if bool(args.world) == bool(args.image_dir or args.pope_dir):
        parser.error("give --world DIR, or --image-dir and --pope-dir")
    if args.world:
        world = Path(args.world)
        if not world.exists():
            if not args.world_images:
                parser.error(f"{world}: no such EmojiCOCO folder; add --world-images N to generate it")
            from vlmfix.data.world import main as generate_world

            generate_world(world, args.world_images, args.seed)
        images, pope_dir = world / "images", world
    elif not (args.image_dir and args.pope_dir):
        parser.error("official POPE files need both --image-dir and --pope-dir")
    else:
        images, pope_dir = Path(args.image_dir), Path(args.pope_dir)
    parquet = write_pope_dataset(args.out, images, pope_dir, args.splits, args.limit)
    task = write_pope_task(args.out, args.out, args.task)
    print(f"{parquet}\n{task}\nrun: lmms-eval --model vlmfix --model_args pretrained=demo,methods=var "
          f"--include_path {args.out} --tasks {args.task}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
