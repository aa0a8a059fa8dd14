"""vlmfix as an lmms-eval model (vlmfix.integrations): lmms-eval's own POPE task (its YAML and scoring
code, unmodified) run by the `lmms-eval` command with `--model vlmfix`, found through the entry point,
on a local POPE copy written from an EmojiCOCO world, plain and with a method; compared with what
vlmfix's own runner computes on the same items with the exact-match rule. Needs `make lmms-eval`."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: run `make lmms-eval`")

from vlmfix.adapters import VlmfixInputError  # noqa: E402
from vlmfix.eval.tasks import load_config, run  # noqa: E402
from vlmfix.data.errors import DataFormatError  # noqa: E402
from vlmfix.data.pope import load_pope_hf, load_pope_jsonl  # noqa: E402
from vlmfix.data.world import generate_world  # noqa: E402
from vlmfix.integrations import pope_hf  # noqa: E402
from vlmfix.metrics import pope  # noqa: E402

N = 20
BATCH = 5
TASK = "pope_emojicoco"
METHOD = "fastv:keep64"  # acts on every row (64 of the demo's 144 image tokens kept), visible in the sample logs
RUNS = {"plain": "none", "method": METHOD}
# lmms-eval's POPE prompt (tasks/pope/pope.yaml: question + post_prompt), given to vlmfix's runner as its template
POST_PROMPT = "\nAnswer the question using a single word or phrase."
UNSUPPORTED = {"model_type": "blip", "architectures": ["BlipForConditionalGeneration"]}


@pytest.fixture(scope="module")
def pope_copy(tmp_path_factory) -> dict:
    """A 4-image EmojiCOCO world, the first 20 questions of its random split as a local lmms-lab/POPE
    copy, and the task file that points lmms-eval's POPE task at it."""
    root = tmp_path_factory.mktemp("lmms_pope")
    world = root / "world"
    generate_world(world, 4, seed=0)
    folder = root / "pope"
    parquet = pope_hf.write_pope_dataset(folder, world / "images", world, splits=["random"], limit=N)
    task = pope_hf.write_pope_task(folder, folder, TASK)
    return {"root": root, "world": world, "folder": folder, "parquet": parquet, "task": task}


def _environment(root: Path) -> dict:
    """Offline, CPU, one thread per process; no LMMS_EVAL_PLUGINS: vlmfix is found by its entry point."""
    env = {k: v for k, v in os.environ.items() if k != "LMMS_EVAL_PLUGINS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(root / "hf_datasets"),
               TRANSFORMERS_VERBOSITY="error", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def _run(root: Path, name: str, model_args: str, folder: Path) -> dict:
    """lmms-eval's arguments for one run of --model vlmfix on the local POPE task."""
    return {"model": "vlmfix", "model_args": model_args, "tasks": TASK, "include_path": str(folder),
            "batch_size": BATCH, "log_samples": True, "output_path": str(root / "out" / name)}


def _read_run(root: Path, name: str, output: str) -> dict:
    """lmms-eval's aggregated POPE metrics and its sample logs (by doc_id) of one run."""
    results = sorted((root / "out" / name).rglob("*_results.json"))
    samples = sorted((root / "out" / name).rglob(f"*_samples_{TASK}.jsonl"))
    assert results and samples, f"lmms-eval wrote no results for the {name} run:\n{output[-6000:]}"
    return {"results": json.loads(results[-1].read_text())["results"][TASK],
            "samples": sorted((json.loads(line) for line in samples[-1].read_text().splitlines()),
                              key=lambda s: s["doc_id"])}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vlmfix_runner(world: Path, out: Path, model, processor) -> dict:
    """vlmfix's own POPE runner (`vlmfix eval pope`) on the same 20 questions and images, same prompt,
    batches and max_new_tokens, answers parsed with the exact-match rule."""
    config = load_config("pope", overrides={
        "world": str(world), "splits": ["random"], "limit": N, "methods": list(RUNS.values()), "rule": "exact",
        "batch_size": BATCH, "max_new_tokens": 128, "prompt": "{question}" + POST_PROMPT, "out": str(out)})
    results = run("pope", config, model, processor)["results"]
    labels = {spec: spec.replace(",", "+").replace(":", "@") for spec in RUNS.values()}
    return {spec: {"metrics": results[spec]["splits"]["random"],
                   "outputs": [json.loads(line)["output"] for line in (out / f"{labels[spec]}.jsonl").open()]}
            for spec in RUNS.values()}


@pytest.fixture(scope="module")
def evaluated(pope_copy) -> dict:
    """Three things, each on one thread (2-thread OpenMP slows down badly when anything else runs):

    1. `lmms-eval --config`: the plain run, a wrong `methods=` and an unsupported model (the last two
       must fail with vlmfix's error, logged by lmms-eval), while, in this process,
    2. vlmfix's runner answers the same questions plain and with METHOD; then
    3. `accelerate launch --num_processes 2 -m lmms_eval`: the METHOD run, data parallel on the CPU."""
    import vlmfix

    root, folder = pope_copy["root"], pope_copy["folder"]
    env = _environment(root)
    (root / "blip").mkdir()
    (root / "blip" / "config.json").write_text(json.dumps(UNSUPPORTED))
    runs = [_run(root, "plain", "pretrained=demo,methods=none", folder),
            _run(root, "bad_methods", "pretrained=demo,methods=var+bogus", folder),
            _run(root, "unsupported", f"pretrained={root / 'blip'}", folder)]
    (root / "runs.yaml").write_text(yaml.safe_dump(runs))
    command = Path(sys.executable).with_name("lmms-eval")  # this Python's console script, else the one on PATH
    command = str(command) if command.is_file() else shutil.which("lmms-eval")
    assert command, "no lmms-eval command beside this Python or on PATH (make lmms-eval)"
    with open(root / "single.log", "w") as log:
        single = subprocess.Popen([command, "--config", str(root / "runs.yaml")], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, cwd=root)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, processor = vlmfix.load_demo()
            mine = _vlmfix_runner(pope_copy["world"], root / "runner", model, processor)
        finally:
            torch.set_num_threads(threads)
            try:
                single.wait(timeout=900)
            finally:
                single.kill()
    output = (root / "single.log").read_text()
    assert single.returncode == 0, output[-6000:]

    method = _run(root, "method", f"pretrained=demo,methods={METHOD}", folder)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port()), "-m", "lmms_eval"]
    flags = [f"--{k}={v}" for k, v in method.items() if k != "log_samples"] + ["--log_samples"]
    parallel = subprocess.run([*launch, *flags], capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert parallel.returncode == 0, (parallel.stdout + parallel.stderr)[-6000:]
    return {"output": output, "plain": _read_run(root, "plain", output),
            "method": _read_run(root, "method", parallel.stdout + parallel.stderr),
            "runner": mine, "processor": processor}


# ------------------------------------------------------------------------------- data and registration


def test_dataset_has_the_layout_of_lmms_lab_pope(pope_copy):
    import datasets
    from PIL import Image

    loaded = datasets.load_dataset(str(pope_copy["folder"]))
    assert list(loaded) == ["test"] and pope_copy["parquet"].name == "test-00000-of-00001.parquet"
    test = loaded["test"]
    assert test.column_names == list(pope_hf.COLUMNS) and len(test) == N
    assert isinstance(test.features["image"], datasets.Image)
    questions = load_pope_jsonl(pope_copy["world"] / "coco_pope_random.json")[:N]
    for i, (row, q) in enumerate(zip(test, questions)):
        assert (row["id"], row["question_id"], row["question"], row["answer"], row["category"]) == \
            (str(i), str(q.question_id), q.text, q.label, "random")
        assert row["image_source"] == Path(q.image).stem
        with Image.open(pope_copy["world"] / "images" / q.image) as original:
            assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(original.convert("RGB")))
    # vlmfix's own reader of lmms-lab/POPE copies reads the same questions back
    back = load_pope_hf(pope_copy["folder"], "random")
    assert [(b.question_id, b.image, b.text, b.label) for b in back] == \
        [(q.question_id, Path(q.image).stem, q.text, q.label) for q in questions]


def test_dataset_writer_refuses_bad_input(pope_copy, tmp_path):
    with pytest.raises(ValueError, match="limit is 999 but .* has 24 questions"):
        pope_hf.write_pope_dataset(tmp_path, pope_copy["world"] / "images", pope_copy["world"], ["random"], 999)
    with pytest.raises(ValueError, match="POPE splits must be among"):
        pope_hf.write_pope_dataset(tmp_path, pope_copy["world"] / "images", pope_copy["world"], ["val"])
    with pytest.raises(DataFormatError, match="image '000001.png' not found"):
        pope_hf.write_pope_dataset(tmp_path, tmp_path, pope_copy["world"], ["random"], 1)


def test_task_file_includes_lmms_evals_pope_task_unmodified(pope_copy):
    spec = importlib.util.find_spec("lmms_eval")
    installed = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "pope" / "pope.yaml"
    task = yaml.safe_load(pope_copy["task"].read_text())
    assert task == {"include": str(installed), "task": TASK, "dataset_path": str(pope_copy["folder"].resolve()),
                    "dataset_kwargs": {}}
    # the prompt the runner is given is lmms-eval's: question + its default post_prompt
    text = installed.read_text()
    assert f"post_prompt: {json.dumps(POST_PROMPT)}" in text


def test_entry_point_names_the_model_class():
    (entry,) = [ep for ep in metadata.entry_points(group="lmms_eval.models") if ep.name == "vlmfix"]
    manifest = entry.load()()
    assert (manifest.model_id, manifest.simple_class_path, manifest.chat_class_path) == \
        ("vlmfix", "vlmfix.integrations.lmms_eval.VlmfixLMM", None)


def test_model_args_parsing():
    from vlmfix.integrations.lmms_eval import method_spec, parse_dtype, parse_sink_dims

    assert method_spec("var+gift") == "var,gift" and method_spec(" var:general ") == "var:general"
    assert method_spec("none") == "none" and method_spec("") == "none"
    assert parse_sink_dims(None) is None and parse_sink_dims(507) == [507]
    assert parse_sink_dims("1512+2298") == parse_sink_dims("[1512,2298]") == [1512, 2298]
    with pytest.raises(VlmfixInputError, match="expected integers joined by"):
        parse_sink_dims("1512+x")
    assert parse_dtype("auto") is None and str(parse_dtype("bfloat16")) == "torch.bfloat16"
    with pytest.raises(VlmfixInputError, match="choose one of auto, float32"):
        parse_dtype("fp8")


@pytest.mark.parametrize("model_args, message", [
    ("methods=var+bogus", "unknown method 'bogus'; available: dart, divprune, fastv, gift, icd, m3id, only, opera, pai, pool, random, sparsevlm, staged, vaf, var, vcd, visionzip. Give NAME or NAME:PRESET"),
    ("methods=var:nope", "unknown var preset 'nope'"),
    ("batch_size=auto", "batch_size='auto': give a number of prompts >= 1"),
    ("sink_dims=1+x", "sink_dims='1+x': expected integers joined by '+'"),
    ("dtype=fp8", "dtype='fp8': choose one of auto, float32, bfloat16, float16"),
    ("temperature=0", "unknown model_args ['temperature'] for --model vlmfix; known: pretrained, methods"),
])
def test_bad_model_args_are_refused_before_loading(model_args, message):
    from vlmfix.integrations.lmms_eval import VlmfixLMM

    with pytest.raises(VlmfixInputError, match=re.escape(message)):  # lmms-eval's flags second: --model_args win
        VlmfixLMM.create_from_arg_string(f"pretrained=demo,{model_args}", {"batch_size": 2, "device": None})
    with pytest.raises(VlmfixInputError, match="max_batch_size bounds batch_size=auto"):
        VlmfixLMM.create_from_arg_string("pretrained=demo", {"batch_size": 2, "max_batch_size": 8})


def test_row_records_read_each_rows_own_record():
    """What the sample logs carry, on a tiny LLaVA with VAR, GIFT and FastV: each row's own values."""
    import vlmfix
    from tiny import chat_after, make_batch, make_model, tokenizer

    from vlmfix.integrations.lmms_eval import row_records
    from vlmfix.methods.prune import kept_tokens

    model = make_model("llava")
    batch = make_batch("llava", model, [([1, 5, 6], (30, 30), chat_after()),
                                        ([1, 12], (40, 70), chat_after(" Is there a red dog?"))])
    methods = [vlmfix.VAR(tau=1.2, m_min=0.05, rho=0.3, layers=(2, 3)),  # acts on the tiny models (see test_var)
               vlmfix.GIFT(), vlmfix.FastVPrune(layer=3, keep=16)]
    with vlmfix.attach(model, tokenizer(), methods, sink_dims=[0, 1], tau=1.2) as fixed:
        fixed.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        rows = row_records(fixed, "var,gift,fastv", 1, 7, 2)
        state = fixed.last_state
    var = vlmfix.VAR.summary(state)
    for r, entry in enumerate(rows):
        assert {k: v for k, v in entry.items() if k not in ("fastv_notes", "gift_note")} == {
            "methods": "var,gift,fastv", "process": 1, "batch": 7, "batch_size": 2,
            "image_tokens": len(state.rows[r].image_positions),
            "visual_sinks": {str(layer): len(state.visual_sinks(layer, r)) for layer in sorted(state.phi)},
            "var_moved": float(sum(v["moved"][r] for v in var.values())),
            "fastv_kept": len(kept_tokens(state, r)), "gift_boosted": bool(state.record(vlmfix.GIFT).has_map[r])}
    assert rows[0]["var_moved"] > 0 and rows[0]["var_moved"] != rows[1]["var_moved"] and rows[0]["fastv_kept"] == 16
    assert rows[0]["visual_sinks"] != rows[1]["visual_sinks"]
    assert row_records(None, "none", 0, 3, 2) == [{"methods": "none", "process": 0, "batch": 3, "batch_size": 2}] * 2


# ------------------------------------------------------------------------------- lmms-eval's scoring


def _lmms_pope_utils():
    """lmms-eval's tasks/pope/utils.py (the scoring code its POPE task runs), loaded from its file."""
    path = Path(next(iter(importlib.util.find_spec("lmms_eval").submodule_search_locations))) / "tasks/pope/utils.py"
    spec = importlib.util.spec_from_file_location("lmms_pope_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lmms_eval_pope_scoring_differs_from_vlmfix_rules_as_documented():
    """The differences docs/lmms_eval.md states, on a hand-computed fixture: lmms-eval scores the
    whole lower-cased answer ("Yes." is wrong), an unparsed answer leaves its recall denominator,
    and its yes-ratio is the share of "yes" labels."""
    utils = _lmms_pope_utils()
    answers, labels = ["Yes.", "yes", "No", "No"], ["yes", "yes", "yes", "no"]
    scored = [utils.pope_process_results({"answer": g, "question_id": str(i)}, [a])["pope_accuracy"]
              for i, (a, g) in enumerate(zip(answers, labels))]
    assert [s["score"] for s in scored] == [0.0, 1.0, 0.0, 1.0]
    lmms = {"accuracy": utils.pope_aggregate_accuracy(scored), "recall": utils.pope_aggregate_recall(scored),
            "yes_ratio": utils.pope_aggregate_yes_ratio(scored)}
    assert lmms == {"accuracy": 0.5, "recall": 0.5, "yes_ratio": 0.75}  # recall 1 / (1 + 1): "yes." left out
    exact = pope.pope_metrics([pope.parse_answer(a, "exact") for a in answers], labels)
    assert (exact["accuracy"], exact["recall"], exact["yes_ratio"]) == (0.5, 1 / 3, 0.25)
    reference = pope.pope_metrics([pope.parse_answer(a, "reference") for a in answers], labels)
    assert (reference["accuracy"], reference["recall"], reference["yes_ratio"]) == (0.75, 2 / 3, 0.5)


# ------------------------------------------------------------------------------- lmms-eval runs


@pytest.mark.parametrize("run_name", list(RUNS))
def test_lmms_eval_pope_equals_vlmfix_runner(evaluated, run_name):
    """lmms-eval's accuracy equals vlmfix's runner's exact-match accuracy, answer for answer."""
    mine = evaluated["runner"][RUNS[run_name]]
    theirs = evaluated[run_name]
    assert mine["metrics"]["n"] == N and mine["metrics"]["unparsed"] == 0
    assert [s["pope_accuracy"]["prediction"] for s in theirs["samples"]] == [o.lower().strip() for o in mine["outputs"]]
    assert theirs["results"]["pope_accuracy,none"] == mine["metrics"]["accuracy"]
    # with every answer parsed, precision and recall agree too
    assert theirs["results"]["pope_precision,none"] == mine["metrics"]["precision"]
    assert theirs["results"]["pope_recall,none"] == mine["metrics"]["recall"]


def test_sample_logs_record_what_vlmfix_did(evaluated, pope_copy):
    from PIL import Image

    from vlmfix.adapters.chat import chat_prompt, chat_turn

    # plain: one process; with METHOD: two, document i on process i mod 2
    where = {"plain": lambda i: (0, i // BATCH), "method": lambda i: (i % 2, i // 2 // BATCH)}
    for run_name, spec in RUNS.items():
        logs = [s["token_counts"][0] for s in evaluated[run_name]["samples"]]
        assert [(c["vlmfix"]["methods"], (c["vlmfix"]["process"], c["vlmfix"]["batch"]), c["vlmfix"]["batch_size"])
                for c in logs] == [(spec, where[run_name](i), BATCH) for i in range(N)]
        assert all(c["output_tokens"] >= 1 for c in logs)
    pruned = [s["token_counts"][0]["vlmfix"] for s in evaluated["method"]["samples"]]
    assert all(r["image_tokens"] == 144 and r["fastv_kept"] == 64 for r in pruned)
    assert "image_tokens" not in evaluated["plain"]["samples"][0]["token_counts"][0]["vlmfix"]  # not attached
    # the prompt is vlmfix's chat prompt: same text, same number of tokens as the runner's
    processor, sample = evaluated["processor"], evaluated["plain"]["samples"][0]
    assert sample["input"] == load_pope_jsonl(pope_copy["world"] / "coco_pope_random.json")[0].text + POST_PROMPT
    text = chat_turn(processor, sample["input"], 1, 0)
    assert text == chat_prompt(processor, sample["input"], True)
    with Image.open(pope_copy["world"] / "images" / "000001.png") as image:
        tokens = processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")["input_ids"].shape[1]
    assert sample["token_counts"][0]["input_tokens"] == tokens


def test_lmms_eval_shows_vlmfix_errors(evaluated):
    output = evaluated["output"]
    assert "model_args methods='var+bogus': unknown method 'bogus'; available: dart, divprune, fastv, gift, icd, m3id, only, opera, pai, pool, random, sparsevlm, staged, vaf, var, vcd, visionzip" in output
    assert "vlmfix does not support BlipForConditionalGeneration" in output
    assert "Supported families:" in output
