"""POPE and CHAIR as tasks of `vlmfix.eval.runner` (`vlmfix eval`, `evals/pope.py`, `evals/chair.py`;
docs/evaluation.md).

Configuration, each layer replacing the keys it sets: configs/evals/<task>.yaml, then the file of
`--config`, then the flags. A `data` section is replaced as a whole, and any data flag (--data,
--image-dir, --pope-dir, --pope-hf, --instances, --captions) replaces it. `data` is either
`world: DIR` (an EmojiCOCO folder, generated first when missing and `world_images` is set) or
the files of a real dataset: `images` plus `pope_dir` (the official coco_pope_<split>.json) or
`pope_hf` (a local copy of lmms-lab/POPE) for POPE; `images`, `instances` and `captions` (lists of
COCO-format files, merged: e.g. val2014 and train2014) for CHAIR.
"""

from __future__ import annotations

import random
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import yaml

from vlmfix.data.errors import DataFormatError
from vlmfix.loading import DTYPES

if TYPE_CHECKING:
    from vlmfix.eval.runner import Task

TASKS = ("pope", "chair", "amber")
COMMON_KEYS = ("model", "dtype", "data", "world_images", "methods", "batch_size", "max_new_tokens", "prompt",
               "seed", "out", "prep_workers", "settings", "tau")
TASK_KEYS = {"pope": ("splits", "limit", "rule"), "chair": ("n_images", "image_ids"),
             "amber": ("limit", "rule", "question_prompt")}
#: CHAIR's sample size in the literature: `eval chair` without --n-images captions this many images (or all, if fewer)
CHAIR_SAMPLE = 500
DATA_KEYS = {"pope": ("world", "images", "pope_dir", "pope_hf"), "chair": ("world", "images", "instances", "captions"),
             "amber": ("world", "images", "amber_dir")}


# ------------------------------------------------------------------------------- configuration


def load_config(task: str, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """The settings of `task`: configs/evals/<task>.yaml, then the file `path`, then `overrides`
    (None values are ignored; data keys replace the `data` section)."""
    from vlmfix.core.presets import configs_dir

    if task not in TASKS:
        raise ValueError(f"unknown evaluation {task!r}; available: {', '.join(TASKS)}")
    config = _read_yaml(configs_dir() / "evals" / f"{task}.yaml", task)
    if path is not None:
        config.update(_read_yaml(Path(path), task))
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    data = {k: given.pop(k) for k in DATA_KEYS[task] if k in given}
    if data:
        config["data"] = data
    config.update(given)
    _check(config, task)
    return config


def method_settings(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The config's `settings` ("NAME.PARAM=VALUE" strings) as {NAME: {PARAM: value}}."""
    from vlmfix.methods import parse_settings

    return parse_settings(config.get("settings") or [])


def config_tau(config: Mapping[str, Any]) -> float | str | None:
    """The sink threshold of a config: its `tau`, else a "tau=VALUE" setting, else None (the model's)."""
    return config["tau"] if config.get("tau") is not None else method_settings(config).get("", {}).get("tau")


def read_yaml_mapping(path: Path, what: str, known: Sequence[str]) -> dict:
    """The mapping a YAML file holds (`what` names the file in errors): a missing file, invalid YAML, a non-mapping
    or a key not in `known` is an error that says so."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataFormatError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise DataFormatError(f"{path}: expected a mapping of settings, got {type(config).__name__}")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise DataFormatError(f"{path}: unknown key(s) {unknown}; known: {', '.join(known)}")
    return config


def _read_yaml(path: Path, task: str) -> dict:
    known = COMMON_KEYS + TASK_KEYS[task]
    config = read_yaml_mapping(path, f"{task} config", known)
    if "data" in config:
        _check_data(config["data"], task, str(path))
    return config


def _check_data(data: Any, task: str, where: str) -> None:
    if not isinstance(data, dict) or not data:
        raise DataFormatError(f"{where}: 'data' must be a mapping with keys among {', '.join(DATA_KEYS[task])}")
    unknown = sorted(set(data) - set(DATA_KEYS[task]))
    if unknown:
        raise DataFormatError(f"{where}: unknown data key(s) {unknown} for {task}; known: {', '.join(DATA_KEYS[task])}")
    if "world" in data and len(data) > 1:
        raise DataFormatError(f"{where}: data 'world' (an EmojiCOCO folder) excludes {sorted(set(data) - {'world'})}")


def _check(config: dict, task: str) -> None:
    missing = [k for k in COMMON_KEYS + TASK_KEYS[task] if k not in config]
    if missing:
        raise ValueError(f"{task} config lacks {missing}")
    _check_data(config["data"], task, "config")
    if config["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {config['dtype']!r}")
    if isinstance(config["methods"], str):
        config["methods"] = [config["methods"]]
    for key in ("batch_size", "max_new_tokens", "world_images", "limit", "n_images"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if isinstance(config["settings"], str):
        config["settings"] = [config["settings"]]
    settings = method_settings(config)  # an unknown method or parameter fails here, before anything runs
    if settings.get("", {}).get("tau") is not None and config["tau"] is not None:
        raise ValueError("tau is given twice (tau and a tau=VALUE setting); give one")
    workers = config["prep_workers"]
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
        raise ValueError(f"prep_workers must be null (automatic) or an integer >= 0, got {workers!r}")
    if task in ("pope", "amber"):
        from vlmfix.metrics.pope import RULES

        if config["rule"] not in RULES:
            raise ValueError(f"unknown POPE answer rule {config['rule']!r}; valid rules: {', '.join(RULES)}")
    if task == "amber":
        for key in ("prompt", "question_prompt"):
            if "{query}" not in config[key]:
                raise ValueError(f"the AMBER {key} must contain {{query}} (the benchmark's query), e.g. '{{query}}'")
    if task == "pope":
        from vlmfix.data.pope import check_splits

        check_splits(config["splits"])
        if "{question}" not in config["prompt"]:
            raise ValueError("the POPE prompt must contain {question}, e.g. "
                             "'{question}\\nAnswer the question using a single word or phrase.'")


# ------------------------------------------------------------------------------- data


def resolve_data(task: str, config: dict) -> dict[str, Any]:
    """Absolute data paths; an EmojiCOCO `world` that does not exist is generated first (main
    process) when `world_images` is set."""
    data = config["data"]
    if "world" in data:
        world = Path(data["world"]).resolve()
        if not world.exists():
            if config["world_images"] is None:
                raise FileNotFoundError(
                    f"{world}: no such EmojiCOCO folder; pass --world-images N (and --seed S) to generate it, or "
                    f"run `vlmfix world --out {data['world']} --n-images N`")
            from vlmfix.data.world import main as generate_world

            from vlmfix.eval.runner import accelerator

            with accelerator().main_process_first():
                if not world.exists():
                    print(f"generating an EmojiCOCO world of {config['world_images']} images (seed {config['seed']}) "
                          f"in {world}", file=sys.stderr)
                    generate_world(world, config["world_images"], config["seed"])
        if not (world / "instances.json").is_file():
            raise FileNotFoundError(f"{world}: not an EmojiCOCO folder (no instances.json); generate it with "
                                    "`vlmfix world --out DIR` or pass the dataset's files")
        data = {"world": str(world), "images": world / "images"}
        if task == "pope":
            data["pope_dir"] = world
        elif task == "amber":
            data["amber_dir"] = _emojicoco_amber(world)
        else:
            data.update(instances=[world / "instances.json"], captions=[world / "captions.json"])
    needed = {"pope": ("images", "pope_dir|pope_hf"), "chair": ("images", "instances", "captions"),
              "amber": ("images", "amber_dir")}[task]
    for key in needed:
        if not any(data.get(k) for k in key.split("|")):
            raise ValueError(f"{task} data lacks {key.replace('|', ' or ')} (or give an EmojiCOCO folder with --data)")
    if task == "pope" and data.get("pope_dir") and data.get("pope_hf"):
        raise ValueError("give POPE questions as pope_dir or pope_hf, not both")
    resolved: dict[str, Any] = {k: str(Path(v).resolve()) for k, v in data.items()
                                if v and k not in ("instances", "captions")}
    for key in ("instances", "captions"):  # lists of files (a single path is a list of one)
        if data.get(key):
            paths = [data[key]] if isinstance(data[key], (str, Path)) else data[key]
            resolved[key] = [str(Path(p).resolve()) for p in paths]
    if not Path(resolved["images"]).is_dir():
        raise FileNotFoundError(f"{resolved['images']}: image folder not found")
    return resolved


def _emojicoco_amber(world: Path) -> Path:
    """The AMBER-format split of an EmojiCOCO world (`<world>/amber`, written by the main process when missing)."""
    from vlmfix.data.amber import write_emojicoco_amber

    from vlmfix.eval.runner import accelerator

    folder = world / "amber"
    with accelerator().main_process_first():
        if not (folder / "annotations.json").is_file():
            write_emojicoco_amber(world, folder)
    return folder


def _check_count(key: str, count: int | None, available: int, source: str, unit: str, unset: str) -> None:
    """A count beyond the data is an error, as everywhere in vlmfix: it names the flag, how many there are and
    what leaving the flag out does (`unset`)."""
    if count is not None and count > available:
        raise ValueError(f"{key} is {count} but {source} has {available} {unit}: pass --{key.replace('_', '-')} "
                         f"{available} or fewer (or leave it out for {unset})")


def _image_finder(folder: str):
    """name -> existing file of the image folder ("x", else "x.jpg", "x.png"), or None."""
    root = Path(folder)

    @lru_cache(maxsize=None)
    def find(name: str) -> Path | None:
        for candidate in (name, f"{name}.jpg", f"{name}.png"):
            if (root / candidate).is_file():
                return root / candidate
        return None

    return find


# ------------------------------------------------------------------------------- POPE


def pope_task(config: dict, data: dict) -> Task:
    """POPE (Li et al., EMNLP 2023): one item per question of each split; metrics per split and their mean."""
    from vlmfix.data.pope import load_pope_hf, load_pope_jsonl, pope_file
    from vlmfix.metrics import pope
    from vlmfix.eval.runner import Item, Task

    rule, splits, template = config["rule"], list(config["splits"]), config["prompt"]
    find = _image_finder(data["images"])
    items = []
    for split in splits:
        if "pope_hf" in data:
            source, questions = f"{data['pope_hf']} ({split})", load_pope_hf(data["pope_hf"], split)
        else:
            path = pope_file(data["pope_dir"], split)
            source, questions = str(path), load_pope_jsonl(path)
        limit = config["limit"]
        _check_count("limit", limit, len(questions), source, "questions", "all of them")
        for q in questions[:limit]:
            image = find(q.image)
            if image is None:
                raise DataFormatError(f"{source}: question_id {q.question_id}: image {q.image!r} not found in "
                                      f"{data['images']}")
            items.append(Item(f"{split}/{q.question_id}", image, template.replace("{question}", q.text),
                              {"split": split, "question_id": q.question_id, "image": q.image, "label": q.label}))

    def score(records: list[dict]) -> dict:
        per_split = {}
        for split in splits:
            rows = [r for r in records if r["split"] == split]
            per_split[split] = pope.pope_metrics([pope.parse_answer(r["output"], rule) for r in rows],
                                                 [r["label"] for r in rows])
        return {"rule": rule, "splits": per_split, "mean": pope.mean_over_splits(per_split)}

    def report(metrics: Mapping[str, dict]) -> str:
        lines = [f"## Mean over splits ({', '.join(splits)}), in percent; answers parsed with the {rule!r} rule",
                 "", "| method set | accuracy | precision | recall | F1 | yes-ratio |",
                 "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {spec} | " + " | ".join(f"{100 * m['mean'][k]:.1f}" for k in pope.METRICS) + " |"
                  for spec, m in metrics.items()]
        sections = [f"## {spec}\n\n{pope.format_table(m['splits'], rule)}" for spec, m in metrics.items()]
        return "\n".join(lines) + "\n\n" + "\n".join(sections)

    settings = {"data": data, "prompt": template, "splits": splits, "limit": config["limit"], "rule": rule}
    return Task("pope", items, score, report, config=settings,
                identity={"prompt": template, "data": data})


# ------------------------------------------------------------------------------- CHAIR


def _merge_coco(parts: list[dict]) -> dict:
    """One COCO dict from several files of a kind (e.g. train2014 + val2014): images by id, all
    annotations, the first file's categories."""
    images = {im["id"]: im for part in parts for im in part["images"]}
    merged = {"images": list(images.values()), "annotations": [a for part in parts for a in part["annotations"]]}
    if "categories" in parts[0]:
        merged["categories"] = parts[0]["categories"]
    return merged


def _chosen_ids(config: dict, pool: list[int], source: str) -> list[int]:
    """The image ids to caption: the `image_ids` file, else `n_images` drawn with `seed` (None: every image,
    at most `CHAIR_SAMPLE` of them, drawn the same way)."""
    import json

    if config["image_ids"] is not None:
        path = Path(config["image_ids"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image id file not found")
        try:
            listed = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: not valid JSON ({err.msg})") from None
        ids = listed.get("image_ids") if isinstance(listed, dict) else listed
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise DataFormatError(f"{path}: expected a non-empty JSON list of image ids (or {{\"image_ids\": [...]}})")
        unknown = sorted(set(ids) - set(pool))
        if unknown:
            raise DataFormatError(f"{path}: {len(unknown)} image id(s) are not images of {source} (first {unknown[0]})")
        return ids
    n = config["n_images"]
    _check_count("n_images", n, len(pool), source, "images", f"all of them, at most {CHAIR_SAMPLE}")
    return sorted(random.Random(config["seed"]).sample(sorted(pool), min(len(pool), n or CHAIR_SAMPLE)))


def chair_task(config: dict, data: dict) -> Task:
    """CHAIR (Rohrbach et al., EMNLP 2018): one caption per image drawn from the first instances file; ground
    truth from all instances and captions files."""
    from vlmfix.data.coco import load_captions, load_instances
    from vlmfix.metrics.chair import CHAIR
    from vlmfix.eval.runner import Item, Task

    parts = [load_instances(p).dataset for p in data["instances"]]
    instances = _merge_coco(parts)
    captions = _merge_coco([load_captions(p).dataset for p in data["captions"]])
    annotated = {im["id"] for im in instances["images"]}
    absent = sorted({a["image_id"] for a in captions["annotations"]} - annotated)
    if absent:
        raise DataFormatError(
            f"{', '.join(data['captions'])}: captions of {len(absent)} image(s) absent from the instances "
            f"annotations {', '.join(data['instances'])} (first image_id {absent[0]}); pass the matching files "
            "(e.g. both train2014 and val2014 for instances and captions)")
    source = data["instances"][0]
    first = {im["id"]: im for im in parts[0]["images"]}
    ids = _chosen_ids(config, list(first), source)
    find = _image_finder(data["images"])
    items = []
    for image_id in ids:
        image = find(first[image_id]["file_name"])
        if image is None:
            raise DataFormatError(f"{source}: image {image_id} ({first[image_id]['file_name']}) not found in "
                                  f"{data['images']}")
        items.append(Item(str(image_id), image, config["prompt"],
                          {"image_id": image_id, "file_name": first[image_id]["file_name"]}))
    # ground truth of the chosen images only: parsing every reference caption of COCO takes minutes
    chosen = set(ids)
    evaluator = CHAIR(instances, {"images": [im for im in captions["images"] if im["id"] in chosen],
                                  "annotations": [a for a in captions["annotations"] if a["image_id"] in chosen]})

    def score(records: list[dict]) -> dict:
        return evaluator.compute([{"image_id": r["image_id"], "caption": r["output"]} for r in records])

    def report(metrics: Mapping[str, dict]) -> str:
        lines = ["## CHAIR (CHAIR_s, CHAIR_i, Recall in percent; Len in words after phrase merging)", "",
                 "| method set | CHAIR_s | CHAIR_i | Recall | Len | captions | mentions | hallucinated |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for spec, m in metrics.items():
            c = m["counts"]
            lines.append(f"| {spec} | {100 * m['CHAIRs']:.1f} | {100 * m['CHAIRi']:.1f} | {100 * m['Recall']:.1f} | "
                         f"{m['Len']:.1f} | {c['captions']} | {c['mentions']} | {c['hallucinated_mentions']} |")
        return "\n".join(lines) + "\n"

    sample = {"seed": config["seed"], "n_images": len(ids), "source": source, "image_ids": ids}
    settings = {"data": data, "prompt": config["prompt"], "image_ids_file": config["image_ids"],
                "sample": {k: v for k, v in sample.items() if k != "image_ids"}, "image_ids": ids}
    return Task("chair", items, score, report, config=settings,
                identity={"prompt": config["prompt"], "data": data}, artifacts={"chair_image_ids.json": sample})


# ------------------------------------------------------------------------------- AMBER


def amber_task(config: dict, data: dict) -> Task:
    """AMBER (Wang et al., 2023; `vlmfix.data.amber`, `vlmfix.metrics.amber`): each query of the folder's
    query_all.json; generative queries through `prompt`, discriminative ones through `question_prompt`
    ({query} replaced); `limit`: the first N queries of each kind."""
    from vlmfix.data.amber import GENERATIVE, load_amber
    from vlmfix.metrics import amber
    from vlmfix.eval.runner import Item, Task

    loaded = load_amber(data["amber_dir"])
    find = _image_finder(data["images"])
    kinds: dict[bool, list] = {True: [], False: []}
    for q in loaded.queries:
        kinds[q.type == GENERATIVE].append(q)
    items = []
    for generative, queries in kinds.items():
        _check_count("limit", config["limit"], len(queries), loaded.source,
                     "generative queries" if generative else "discriminative queries", "all of them")
        template = config["prompt"] if generative else config["question_prompt"]
        for q in queries[:config["limit"]]:
            image = find(q.image)
            if image is None:
                raise DataFormatError(f"{loaded.source}: query {q.id}: image {q.image!r} not found in {data['images']}")
            fields = {"amber_id": q.id, "image": q.image, "type": q.type, "truth": q.truth,
                      **({"hallu": list(q.hallu)} if generative else {})}
            items.append(Item(str(q.id), image, template.replace("{query}", q.query), fields))
    rule = config["rule"]

    def score(records: list[dict]) -> dict:
        out: dict[str, Any] = {}
        gen = [r for r in records if r["type"] == GENERATIVE]
        if gen:
            per = [{"id": r["id"], **amber.generative_item(r["output"], r["truth"], r["hallu"], loaded.association,
                                                           loaded.safe_words)} for r in gen]
            out["generative"] = {**amber.generative_metrics(per), "responses": per}
        disc = [r for r in records if r["type"] != GENERATIVE]
        if disc:
            out["discriminative"] = amber.discriminative_metrics([r["output"] for r in disc], [r["truth"] for r in disc],
                                                                 [r["type"] for r in disc], rule)
        if gen and disc:
            out["amber_score"] = amber.amber_score(out["generative"]["CHAIR"], out["discriminative"]["f1"])
        return out

    def report(metrics: Mapping[str, dict]) -> str:
        lines = ["## AMBER (percent; generative: CHAIR, Cover, Hal, Cog; discriminative: accuracy, F1)", "",
                 "| method set | CHAIR | Cover | Hal | Cog | accuracy | F1 | AMBER score |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for spec, m in metrics.items():
            g, d = m.get("generative", {}), m.get("discriminative", {})
            cells = [g.get(k) for k in amber.GENERATIVE_METRICS] + [d.get("accuracy"), d.get("f1"),
                                                                     m.get("amber_score")]
            lines.append(f"| {spec} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
        return "\n".join(lines) + "\n"

    settings = {"data": data, "prompt": config["prompt"], "question_prompt": config["question_prompt"],
                "limit": config["limit"], "rule": rule}
    return Task("amber", items, score, report, config=settings,
                identity={"prompt": config["prompt"], "question_prompt": config["question_prompt"], "data": data})


TASK_BUILDERS = {"pope": pope_task, "chair": chair_task, "amber": amber_task}


# ------------------------------------------------------------------------------- running


def run(task: str, config: dict, model: Any = None, processor: Any = None, restart: bool = False) -> dict | None:
    """Evaluate `task` with `config` (see `load_config`); loads `config["model"]` unless a
    (model, processor) is given; `restart` discards the output folder's results of these method sets
    first. Returns the results on the main process, else None."""
    import torch

    from vlmfix.loading import load, require_vlm
    from vlmfix.eval.runner import Settings, evaluate, parse_method_sets, prepare

    method_sets = parse_method_sets(config["methods"], method_settings(config))
    data = resolve_data(task, config)
    built = TASK_BUILDERS[task](config, data)
    settings = Settings(model=config["model"], out=Path(config["out"]), dtype=config["dtype"],
                        batch_size=config["batch_size"], max_new_tokens=config["max_new_tokens"], seed=config["seed"],
                        prep_workers=config["prep_workers"], restart=restart, tau=config_tau(config))
    prints = prepare(built, method_sets, settings)  # before the model loads: a bad run fails fast
    if model is None:
        model, processor = load(config["model"], getattr(torch, config["dtype"]))
    require_vlm(processor, config["model"], task)
    results = evaluate(built, model, processor, method_sets, settings, prints)
    if results is not None:
        print((settings.out / "results.md").read_text(encoding="utf-8"))
        for warning in results["warnings"]:
            print(f"vlmfix: warning: {warning}", file=sys.stderr)
        print(f"results: {settings.out / 'results.md'}, {settings.out / 'results.json'}")
    return results
