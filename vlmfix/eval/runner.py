"""A generic, model-agnostic evaluation runner (lm-evaluation-harness style).

An evaluation is a `Task`: the items to answer (id, image, prompt, and fields copied into each
record), a pure `score(records) -> metrics` function and a `report({method set: metrics}) ->
markdown` function (POPE and CHAIR are defined in `vlmfix.eval.tasks`). `evaluate()` runs a task
for one model and several method sets (`prepare()` checks a run before the model is loaded):

- a method set is a spec as on the command line: "none" (the plain model), "var", "gift",
  "var,gift:mild", ... (`vlmfix.methods.parse_methods`; any method of `vlmfix.methods.REGISTRY`);
  each is attached with `vlmfix.core.attach` for its part of the run and detached after;
- generation is greedy and batched, with left padding; when the model sits on an accelerator,
  the next batches are read and run through the processor on a few CPU threads while the current
  one generates (`Settings.prep_workers`; each thread has its own copy of the processor);
- records are appended to `<out>/<label>.jsonl` as they come (flush + fsync per batch);
- a rerun resumes: items already in the method set's files are skipped, a last line cut by a
  crash is dropped (and cut from the file that process writes), so no item is computed twice
  and none is lost. `<out>/<label>.config.json` keeps what determines the outputs (model, dtype,
  methods, max_new_tokens, prompt, data paths, the vlmfix version), and each record the
  `fingerprint` of what its item read (id, prompt, fields such as the label, the bytes of the
  image); a rerun with another config, or whose items read other data than a finished record's,
  is refused (never reusing a stale answer) unless `Settings.restart` discards the method set's
  results first. Items may be added (a larger --limit): they are simply not done yet;
- each record says, per method, whether it acted on the item (`Record.acted`: VAR moved
  attention, GIFT boosted, a pruner dropped tokens); results.json and results.md count the items
  per method and warn when a method acted on none;
- sharding with `accelerate`: process r of n takes the items i with i % n == r and appends to
  its own `<label>.rank<r>.jsonl`; after `wait_for_everyone()` the main process merges the
  shards into `<label>.jsonl` (item order), scores, and writes `results.md` and `results.json`
  (metrics with raw counts, and the full config with library versions).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import platform
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

from vlmfix.data.errors import DataFormatError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL import Image

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
Job = TypeVar("Job")
Made = TypeVar("Made")


@dataclass(frozen=True)
class Item:
    """One thing to generate: a unique id, an image file, the user's text, and `fields` copied into
    its record (labels, split, image id, ...)."""

    id: str
    image: Path
    prompt: str
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Task:
    """An evaluation: items plus pure metric functions.

    - `score(records)`: the records of one method set, in item order, each {"id", **fields,
      "prompt", "output"} -> a JSON-able dict of metrics with their raw counts;
    - `report(metrics)`: {method set spec: score output} -> markdown;
    - `config`: the task's settings, recorded in results.json;
    - `identity`: the part of them that determines each item's output (prompt, data); a resumed
      run must have the same;
    - `artifacts`: {file name: JSON-able} the main process writes to the output folder first
      (e.g. CHAIR's image id list).
    """

    name: str
    items: Sequence[Item]
    score: Callable[[list[dict]], dict]
    report: Callable[[Mapping[str, dict]], str]
    config: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSet:
    """A method-set spec ("none", "var,gift:mild"), its file label and its method objects."""

    spec: str
    label: str
    methods: tuple


@dataclass(frozen=True)
class Settings:
    """How to generate: the model's name (as recorded), dtype, batch size, max_new_tokens, seed,
    the output folder, and `prep_workers`: CPU threads that prepare the next batches (image
    decoding, processor) while one generates; None = 0 for a model on the CPU (it needs the
    cores), else min(8, cores per process - 1). It changes speed only, never an output.
    `restart`: discard the output folder's results of the method sets being run, and start afresh.
    `tau`: the sink threshold of attach (None: the model preset's, else scaled); `progress_row`: the line of the
    per-method-set progress bar (1 below a grid's bar in `vlmfix compare`)."""

    model: str
    out: Path
    dtype: str = "float32"
    batch_size: int = 8
    max_new_tokens: int = 8
    seed: int = 0
    prep_workers: int | None = None
    restart: bool = False
    tau: float | str | None = None
    progress_row: int = 0


# ------------------------------------------------------------------------------- method sets


def parse_method_sets(specs: Iterable[str], settings: Mapping[str, Mapping[str, Any]] | None = None) -> list[MethodSet]:
    """Method sets from their specs, with `settings` ({NAME: {PARAM: value}}, `vlmfix.methods.parse_settings`)
    applied to the methods of those names; unknown method names or presets raise ValueError."""
    from vlmfix.methods import normal_spec, parse_methods, with_settings

    sets: list[MethodSet] = []
    for raw in specs:
        spec = normal_spec(raw)
        label = spec.replace(",", "+").replace(":", "@")
        if any(s.label == label for s in sets):
            raise ValueError(f"method set {spec!r} is given twice")
        sets.append(MethodSet(spec, label, tuple(with_settings(parse_methods(spec), dict(settings or {})))))
    if not sets:
        raise ValueError("no method sets to evaluate (use 'none' for the plain model)")
    return sets


def method_params(methods: Iterable[Any], runtimes: Sequence[Any] = ()) -> list[dict]:
    """[{"name", "class", "params"}] of method configs (params: their dataclass fields, with what attach
    resolved for the model, `Runtime.resolved()`, in place of the defaults left as None)."""
    resolved = {id(r.config): r.resolved() for r in runtimes}
    return [{"name": m.name, "class": type(m).__name__,
             "params": json.loads(json.dumps({**dataclasses.asdict(m), **resolved.get(id(m), {})}, default=str))}
            for m in methods]


# ------------------------------------------------------------------------------- result files


def read_records(path: Path, repair: bool = False) -> list[dict]:
    """The complete records of a results JSONL file ([] when it does not exist).

    A last line without its newline is a write cut by a crash: it is ignored and, with
    `repair`, cut from the file. Any other malformed line raises DataFormatError (file:line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if repair and complete < len(data):
        with open(path, "r+b") as f:
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    records = []
    for lineno, line in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{lineno}: not valid JSON ({err.msg}); delete the line (or the file) "
                                  "to recompute it") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise DataFormatError(f"{path}:{lineno}: a result record must be an object with a string 'id'")
        records.append(record)
    return records


def append_records(path: Path, records: Sequence[dict]) -> None:
    """Append records as JSON lines, flushed and fsync'ed."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def own_file(out: Path, label: str, rank: int, num_processes: int) -> Path:
    """The file a process appends to: `<label>.jsonl` alone, `<label>.rank<r>.jsonl` in a group."""
    return out / (f"{label}.jsonl" if num_processes == 1 else f"{label}.rank{rank}.jsonl")


def result_files(out: Path, label: str) -> list[Path]:
    """The merged file and every process shard of a method set (of this run or earlier ones)."""
    return [out / f"{label}.jsonl", *sorted(out.glob(f"{label}.rank*.jsonl"))]


def done_ids(out: Path, label: str) -> set[str]:
    """Ids of the items already computed for a method set, over all its files."""
    return {r["id"] for path in result_files(out, label) for r in read_records(path)}


def merge(out: Path, label: str, items: Sequence[Item]) -> list[dict]:
    """Merge a method set's files into `<label>.jsonl` (item order first, then records of items no
    longer asked for), remove the shards, and return the records of `items` in their order.

    Raises RuntimeError when an item has no record (a process failed before writing it)."""
    files = result_files(out, label)
    found: dict[str, dict] = {}
    for path in files:
        for record in read_records(path):
            found.setdefault(record["id"], record)
    order = [item.id for item in items]
    missing = [i for i in order if i not in found]
    if missing:
        raise RuntimeError(f"{label}: {len(missing)} item(s) have no result (first {missing[0]!r}); rerun to "
                           "compute them")
    wanted = set(order)
    merged = [found[i] for i in order] + [r for i, r in found.items() if i not in wanted]
    write_atomic(out / f"{label}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
    for path in files[1:]:
        path.unlink()
    return merged[:len(order)]


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, in hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprints(items: Sequence[Item]) -> dict[str, str]:
    """{item id: a digest of everything the item reads}: its id, prompt, fields (label, ...), image file
    name and the sha256 of the image's bytes (each file read once); 16 hex digits."""
    images: dict[Path, str] = {}
    found = {}
    for item in items:
        if item.image not in images:
            try:
                images[item.image] = file_sha256(item.image)
            except OSError as err:
                raise DataFormatError(f"{item.image}: cannot read the image ({err.strerror})") from None
        entry = [item.id, item.prompt, dict(item.fields), item.image.name, images[item.image]]
        found[item.id] = hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    return found


def check_records(out: Path, label: str, prints: Mapping[str, str]) -> None:
    """Refuse finished records of a method set whose item now reads other data (another fingerprint)."""
    stale = [r["id"] for path in result_files(out, label) for r in read_records(path)
             if r["id"] in prints and r.get("fingerprint") != prints[r["id"]]]
    if stale:
        raise ValueError(
            f"{out} holds results of {label!r} for {len(stale)} item(s) whose data changed since (first {stale[0]!r}: "
            "its question, label, prompt or image differs); rerun with --restart to discard them and start afresh, "
            "or choose another --out")


def check_identity(path: Path, identity: dict, write: bool) -> None:
    """Refuse to resume results produced with another config; record it (`write`) when new."""
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in {*old, *identity} if old.get(k) != identity.get(k))
        if changed:
            said = "; ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in changed)
            raise ValueError(
                f"{path.parent} holds results of {path.stem.removesuffix('.config')!r} made with another "
                f"{', '.join(changed)} ({said}); rerun with --restart to discard them and start afresh, or "
                "choose another --out"
            )
    elif write:
        write_atomic(path, json.dumps(identity, indent=2, default=str))


def discard(out: Path, label: str) -> None:
    """Remove a method set's results and config from `out` (`Settings.restart`)."""
    for path in [*result_files(out, label), out / f"{label}.config.json"]:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------- processes


@lru_cache(maxsize=None)
def accelerator() -> "Accelerator":
    """The process group's `accelerate.Accelerator`. Started as several processes on a machine
    without CUDA (`accelerate launch --multi_gpu`, `torchrun`), it uses the CPU (gloo) backend."""
    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    acc = Accelerator(cpu=launched > 1 and not torch.cuda.is_available())
    if acc.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but accelerate sees {acc.num_processes}; "
                           "check the launcher's device settings")
    return acc


def versions() -> dict[str, str]:
    """Python, platform and the versions of the libraries that shape the results."""
    from vlmfix import __version__

    found = {"python": sys.version.split()[0], "platform": platform.platform(), "vlmfix": __version__}
    for name in ("torch", "transformers", "accelerate", "tokenizers", "pillow", "pycocotools"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ------------------------------------------------------------------------------- generation


def open_image(path: Path) -> "Image.Image":
    """An RGB PIL image; unreadable files raise DataFormatError naming them."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read the image ({err})") from None


def prepare_batch(processor: Any, items: Sequence[Item]) -> Any:
    """The processor's CPU tensors for a batch: chat prompts, images, left padding."""
    from vlmfix.adapters.chat import chat_prompt

    texts = [chat_prompt(processor, item.prompt, True) for item in items]
    return processor(images=[open_image(item.image) for item in items], text=texts, return_tensors="pt",
                     padding=True, padding_side="left")


@torch.no_grad()
def generate_prepared(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> list[str]:
    """Greedy answers for `prepare_batch`'s output, decoded without special tokens and stripped."""
    inputs = inputs.to(device=model.device, dtype=model.dtype)
    tokenizer = getattr(processor, "tokenizer", processor)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def prep_workers(settings: Settings, model: Any, num_processes: int) -> int:
    """`settings.prep_workers`, or its default for where the model runs (see `Settings`)."""
    if settings.prep_workers is not None:
        return settings.prep_workers
    if torch.device(model.device).type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // num_processes - 1))


def prefetched(make: Callable[[Any, Job], Made], processor: Any, jobs: Sequence[Job],
               workers: int) -> Iterator[Made]:
    """`make(processor, job)` for each job, in order. With workers > 0 the results are computed
    ahead on a thread pool (at most 2 * workers jobs in flight), each thread on its own deep copy
    of the processor: fast tokenizers set their padding state on every call, which is not safe to
    share between threads."""
    if workers <= 0:
        yield from (make(processor, job) for job in jobs)
        return
    local = threading.local()

    def run(job: Job) -> Made:
        if not hasattr(local, "processor"):
            local.processor = copy.deepcopy(processor)
        return make(local.processor, job)

    todo = iter(jobs)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vlmfix-prep")
    try:
        ahead = deque(pool.submit(run, job) for _, job in zip(range(2 * workers), todo))
        while ahead:
            made = ahead.popleft().result()
            for job in todo:
                ahead.append(pool.submit(run, job))
                break
            yield made
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_method_set(model: Any, processor: Any, task: Task, mset: MethodSet, settings: Settings,
                    prints: Mapping[str, str]) -> dict:
    """Generate this process's pending items of one method set (each record with its item's fingerprint
    from `prints`); returns what attach resolved."""
    from tqdm.auto import tqdm

    from vlmfix.core.attach import attach

    acc = accelerator()
    rank, n = acc.process_index, acc.num_processes
    mine = own_file(settings.out, mset.label, rank, n)
    read_records(mine, repair=True)
    done = done_ids(settings.out, mset.label)
    own = [item for i, item in enumerate(task.items) if i % n == rank]
    pending = [item for item in own if item.id not in done]
    where = f" [process {rank}/{n}]" if n > 1 else ""
    print(f"{task.name} {mset.spec}{where}: {len(own) - len(pending)} of {len(own)} items done, "
          f"{len(pending)} to generate", file=sys.stderr, flush=True)
    methods = list(mset.methods)
    handle = attach(model, processor, methods, tau=settings.tau) if methods else contextlib.nullcontext()
    with handle as fixed:
        resolved = {"methods": method_params(methods, fixed.runtimes if fixed is not None else ()),
                    "acts": {r.config.name: r.call.record_type.acts for r in (fixed.runtimes if fixed is not None else ())
                             if r.call.record_type.acts}}
        if fixed is not None and fixed.tracks_sinks:
            resolved.update(sink_dims=list(fixed.sink_dims), tau=fixed.tau, sink_dims_source=fixed.sink_source)
        bar = tqdm(total=len(pending), desc=f"{task.name} {mset.spec}{where}", position=rank + settings.progress_row,
                   unit="item", dynamic_ncols=True)
        batches = [pending[start:start + settings.batch_size] for start in range(0, len(pending), settings.batch_size)]
        prepared = prefetched(prepare_batch, processor, batches, prep_workers(settings, model, n))
        for batch, inputs in zip(batches, prepared):
            answers = generate_prepared(model, processor, inputs, settings.max_new_tokens)
            acted = _acted(fixed, len(batch))
            append_records(mine, [{"id": item.id, **item.fields, "prompt": item.prompt, "output": answer,
                                   **({"acted": flags} if flags else {}), "fingerprint": prints[item.id]}
                                  for item, answer, flags in zip(batch, answers, acted)])
            bar.update(len(batch))
        bar.close()
    return {"label": mset.label, **resolved}


def _acted(fixed: Any, rows: int) -> list[dict[str, bool]]:
    """Per batch row of the last call of `fixed` (None: the plain model): {method name: whether it acted},
    for the methods that say (`Record.acted`)."""
    said = [] if fixed is None else [(rec.method, rec.acted()) for rec in fixed.last_state.records if rec is not None]
    said = [(name, flags) for name, flags in said if flags is not None]
    return [{name: bool(flags[i]) for name, flags in said} for i in range(rows)]


def activity(records: Sequence[dict], acts: Mapping[str, str]) -> dict[str, dict]:
    """{method name: {"what", "items", "of"}}: on how many of the records each method acted."""
    return {name: {"what": f"items where {name} {what}", "of": len(records),
                   "items": sum(bool(r.get("acted", {}).get(name)) for r in records)} for name, what in acts.items()}


def prepare(task: Task, method_sets: Sequence[MethodSet], settings: Settings) -> dict[str, str]:
    """Check a run before any model is loaded (items, settings, the output folder's configs and finished
    records) and write the task's artifacts (main process). Every process checks, so all fail together.
    Returns the items' fingerprints."""
    if not task.items:
        raise ValueError(f"{task.name}: no items to evaluate")
    seen: set[str] = set()
    for item in task.items:
        if item.id in seen:
            raise ValueError(f"{task.name}: item id {item.id!r} occurs twice")
        seen.add(item.id)
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    acc = accelerator()
    settings.out.mkdir(parents=True, exist_ok=True)
    prints = fingerprints(task.items)
    with acc.main_process_first():  # a restart is done before the other processes check
        for mset in method_sets:
            if settings.restart and acc.is_main_process:
                discard(settings.out, mset.label)
            check_identity(settings.out / f"{mset.label}.config.json", _identity(task, mset, settings),
                           acc.is_main_process)
            check_records(settings.out, mset.label, prints)
    if acc.is_main_process:
        for name, content in task.artifacts.items():
            write_atomic(settings.out / name, json.dumps(content, indent=2, default=str))
    return prints


def evaluate(task: Task, model: Any, processor: Any, method_sets: Sequence[MethodSet],
             settings: Settings, prints: Mapping[str, str] | None = None) -> dict | None:
    """Run `task` for each method set (this process's shard), then, on the main process, merge,
    score and write results.md / results.json. `prints`: what `prepare` returned when the caller ran it
    already (before loading the model); otherwise it runs here. Returns the results on the main process,
    else None."""
    from accelerate.utils import set_seed

    if prints is None:
        prints = prepare(task, method_sets, settings)
    acc = accelerator()
    out = settings.out
    set_seed(settings.seed)
    if not getattr(model, "hf_device_map", None):
        model.to(acc.device)
    model.eval()
    resolved = {mset.spec: _run_method_set(model, processor, task, mset, settings, prints) for mset in method_sets}
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None

    metrics, warnings = {}, []
    for mset in method_sets:
        records = merge(out, mset.label, task.items)
        metrics[mset.spec] = task.score(records)
        acted = resolved[mset.spec]["acted"] = activity(records, resolved[mset.spec].pop("acts"))
        warnings += [f"method set `{mset.spec}`: {name} acted on no item ({a['what']}: 0 of {a['of']})"
                     for name, a in acted.items() if a["items"] == 0]
    config = {"task": task.name, "model": settings.model, "dtype": settings.dtype,
              "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens,
              "decoding": "greedy", "seed": settings.seed, "num_processes": acc.num_processes, "tau": settings.tau,
              "items": len(task.items), **task.config, "method_sets": resolved, "versions": versions()}
    results = {"config": config, "results": metrics, "warnings": warnings}
    write_atomic(out / RESULTS_JSON, json.dumps(results, indent=2, default=str))
    write_atomic(out / RESULTS_MD, _markdown(task, config, metrics, warnings))
    return results


def _identity(task: Task, mset: MethodSet, settings: Settings) -> dict:
    from vlmfix import __version__

    return {"task": task.name, "model": settings.model, "dtype": settings.dtype,
            "methods": method_params(mset.methods), "max_new_tokens": settings.max_new_tokens, **task.identity,
            "vlmfix": __version__, **({"tau": settings.tau} if settings.tau is not None and mset.methods else {})}


def _markdown(task: Task, config: dict, metrics: Mapping[str, dict], warnings: Sequence[str]) -> str:
    shown = {k: v for k, v in config.items() if k not in ("task", "method_sets", "versions")}
    lines = [f"# {task.name.upper()} results", ""]
    for key, value in shown.items():
        text = str(value) if isinstance(value, (int, float)) else json.dumps(value, default=str)
        lines.append(f"- {key}: {text if len(text) <= 300 else text[:300] + ' ... (in results.json)'}")
    for spec, mset in config["method_sets"].items():
        params = "; ".join(f"{m['class']} {json.dumps(m['params'], default=str)}" for m in mset["methods"])
        acted = "; ".join(f"{a['items']} of {a['of']} {a['what']}" for a in mset["acted"].values())
        lines.append(f"- method set `{spec}`: {params or 'plain model'}" + (f" (acted: {acted})" if acted else ""))
    lines.append(f"- versions: {', '.join(f'{k} {v}' for k, v in config['versions'].items())}")
    lines += [""] + [f"**Warning**: {w}" for w in warnings] if warnings else []
    return "\n".join(lines) + "\n\n" + task.report(metrics)
