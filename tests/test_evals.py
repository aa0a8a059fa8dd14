"""The POPE / CHAIR runners (vlmfix.eval.runner, vlmfix.cli.eval, evals/): resume after a kill, 2-process
sharding, several method sets in one run, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vlmfix import methods
from vlmfix.methods.base import Runtime
from vlmfix.eval import runner
from vlmfix.cli.main import main
from vlmfix.eval.tasks import _chosen_ids, load_config, pope_task, resolve_data, run
from vlmfix.data.errors import DataFormatError
from vlmfix.data.world import generate_world

ROOT = Path(__file__).resolve().parents[1]
# CPU only, one thread per process: on 2 shared cores, 2-thread OpenMP loses up to 10x whenever other work runs
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
       "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
N_ITEMS = 6
SMALL_RUN = ["--model", "smollm2-llava-small", "--splits", "random", "--limit", str(N_ITEMS), "--batch-size", "2",
             "--max-new-tokens", "4", "--methods", "none"]


@pytest.fixture
def one_thread():
    """torch on one thread for the test (see ENV), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 4-image EmojiCOCO world (24 POPE questions per split)."""
    path = tmp_path_factory.mktemp("emojicoco") / "world"
    generate_world(path, 4, seed=0)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------- no model


def test_read_records_drops_and_repairs_a_cut_last_line(tmp_path):
    path = tmp_path / "none.jsonl"
    runner.append_records(path, [{"id": "a", "output": "yes"}, {"id": "b", "output": "no"}])
    with open(path, "a") as f:
        f.write('{"id": "c", "out')  # a write cut by a crash
    assert [r["id"] for r in runner.read_records(path)] == ["a", "b"]
    assert path.read_text().endswith('"out')  # reading alone leaves the file as it is
    assert [r["id"] for r in runner.read_records(path, repair=True)] == ["a", "b"]
    assert path.read_text().endswith("}\n")
    runner.append_records(path, [{"id": "c", "output": "yes"}])
    assert [r["id"] for r in runner.read_records(path)] == ["a", "b", "c"]
    assert runner.read_records(tmp_path / "absent.jsonl") == []

    path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
    with pytest.raises(DataFormatError, match=r"none\.jsonl:2: not valid JSON"):
        runner.read_records(path)
    path.write_text('{"id": 3}\n')
    with pytest.raises(DataFormatError, match=r":1: .*string 'id'"):
        runner.read_records(path)


def test_resume_skips_done_items_and_merge_keeps_item_order(tmp_path):
    items = [runner.Item(i, tmp_path / "x.png", "q") for i in "abcde"]
    assert runner.own_file(tmp_path, "var", 0, 1).name == "var.jsonl"
    assert runner.own_file(tmp_path, "var", 1, 2).name == "var.rank1.jsonl"
    runner.append_records(tmp_path / "var.jsonl", [{"id": "d"}, {"id": "gone"}])  # an earlier 1-process run
    runner.append_records(tmp_path / "var.rank0.jsonl", [{"id": "c"}, {"id": "a"}])
    (tmp_path / "var.rank1.jsonl").write_text('{"id": "b"}\n{"id": "e", "outp')
    assert runner.done_ids(tmp_path, "var") == {"a", "b", "c", "d", "gone"}
    with pytest.raises(RuntimeError, match=r"1 item\(s\) have no result \(first 'e'\)"):
        runner.merge(tmp_path, "var", items)
    runner.read_records(tmp_path / "var.rank1.jsonl", repair=True)
    runner.append_records(tmp_path / "var.rank1.jsonl", [{"id": "e"}, {"id": "a", "dup": True}])
    merged = runner.merge(tmp_path, "var", items)
    assert [r["id"] for r in merged] == list("abcde") and "dup" not in merged[0]
    assert [r["id"] for r in _lines(tmp_path / "var.jsonl")] == [*"abcde", "gone"]  # nothing computed is lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["var.jsonl"]


def test_prefetched_keeps_order_and_gives_each_thread_its_own_processor():
    class Processor:  # a stand-in whose state a shared copy would corrupt between threads
        def __init__(self):
            self.calls = []

    shared = Processor()
    seen = {}

    def make(processor, job):
        processor.calls.append(job)
        time.sleep(0.002 * (job % 3))  # finish out of order
        seen.setdefault(threading.get_ident(), set()).add(id(processor))
        return job * job, processor

    jobs = list(range(20))
    made = list(runner.prefetched(make, shared, jobs, workers=3))
    assert [m[0] for m in made] == [j * j for j in jobs]  # in job order
    assert shared.calls == [] and all(p is not shared for _, p in made)  # the caller's processor is untouched
    assert sum(len(p.calls) for p in {id(p): p for _, p in made}.values()) == len(jobs)
    assert all(len(ids) == 1 for ids in seen.values())  # one copy per thread, reused
    inline = list(runner.prefetched(make, shared, jobs[:3], workers=0))
    assert [m[0] for m in inline] == [0, 1, 4] and all(p is shared for _, p in inline)


def test_prefetched_stops_its_threads_when_the_consumer_fails():
    started = []

    def make(processor, job):
        started.append(job)
        return job

    gen = runner.prefetched(make, None, list(range(100)), workers=2)
    assert next(gen) == 0
    gen.close()  # as when generation raises: the pool shuts down, queued jobs are cancelled
    assert len(started) <= 1 + 2 * 2 + 1 and not [t for t in threading.enumerate() if t.name.startswith("vlmfix-prep")]


def test_identity_check_refuses_another_config(tmp_path):
    path = tmp_path / "none.config.json"
    runner.check_identity(path, {"model": "m", "prompt": "p"}, write=True)
    runner.check_identity(path, {"model": "m", "prompt": "p"}, write=True)
    with pytest.raises(ValueError, match=r"another prompt \(prompt: 'p' -> 'q'\)"):
        runner.check_identity(path, {"model": "m", "prompt": "q"}, write=False)


def test_method_sets_come_from_the_registry(monkeypatch):
    sets = runner.parse_method_sets(["none", "var", "var, gift:mild", "var:general"])
    assert [s.label for s in sets] == ["none", "var", "var+gift@mild", "var@general"]
    assert [s.spec for s in sets][2] == "var,gift:mild"
    assert sets[0].methods == () and [m.name for m in sets[2].methods] == ["var", "gift"]
    assert sets[2].methods[1].alpha == 2.0

    @dataclass
    class Later(methods.MethodConfig):
        strength: float = 1.0

    methods.register_method(name="later", config=Later, runtime=Runtime)
    try:
        (later,) = runner.parse_method_sets(["later"])
        assert runner.method_params(later.methods) == [{"name": "later", "class": "Later",
                                                        "params": {"strength": 1.0}}]
        with pytest.raises(ValueError, match="unknown method 'fastvv'; available: dart, divprune, fastv, gift, icd, later, m3id, only, opera, pai, pool, random, sparsevlm, staged, vaf, var, vcd, visionzip"):
            runner.parse_method_sets(["fastvv"])
    finally:
        methods.unregister_method("later")
    with pytest.raises(ValueError, match="given twice"):
        runner.parse_method_sets(["var", "var"])


def test_config_layers_yaml_then_file_then_flags(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("batch_size: 3\nmethods: var\ndata:\n  images: /coco/val2014\n  pope_dir: /pope\n")
    config = load_config("pope", mine, {"batch_size": 5, "limit": None})
    assert config["batch_size"] == 5 and config["methods"] == ["var"] and config["max_new_tokens"] == 8
    assert config["data"] == {"images": "/coco/val2014", "pope_dir": "/pope"}
    assert config["prompt"] == "{question}\nAnswer the question using a single word or phrase."
    assert load_config("pope", mine, {"world": "w"})["data"] == {"world": "w"}  # a data flag replaces the section
    chair = load_config("chair")
    assert chair["max_new_tokens"] == 128 and chair["n_images"] is None  # all images, at most 500
    assert chair["prompt"] == "Please describe this image in detail."
    mine.write_text("batch_sise: 3\n")
    with pytest.raises(DataFormatError, match=r"unknown key\(s\) \['batch_sise'\]"):
        load_config("pope", mine)
    with pytest.raises(ValueError, match="must contain {question}"):
        load_config("pope", None, {"prompt": "Is there a dog?"})


def test_pope_items_from_a_local_lmms_lab_copy(world, tmp_path):
    import datasets

    rows = {"id": ["0", "1"], "question_id": ["1", "2"], "question": ["Is there a dog in the image?"] * 2,
            "answer": ["yes", "no"], "image_source": ["000001", "000003"], "category": ["random"] * 2}
    (tmp_path / "Full").mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "Full" / "random-00000-of-00001.parquet")
    config = load_config("pope", None, {"images": str(world / "images"), "pope_hf": str(tmp_path),
                                        "splits": ["random"]})
    task = pope_task(config, resolve_data("pope", config))
    assert [(i.id, i.image.name, i.fields["label"]) for i in task.items] == [
        ("random/1", "000001.png", "yes"), ("random/2", "000003.png", "no")]
    assert task.items[0].prompt == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    records = [{**i.fields, "output": answer} for i, answer in zip(task.items, ["Yes.", "There is no dog."])]
    assert task.score(records)["mean"]["accuracy"] == 1.0


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_fail_before_loading_the_model(world, tmp_path, capsys):
    base = ["--model", "no-such-model", "--out", str(tmp_path / "out")]  # reaching the model load would say so
    err = _fails(["eval", "pope", "--data", str(tmp_path / "absent"), *base], capsys)
    assert "no such EmojiCOCO folder; pass --world-images N" in err
    err = _fails(["eval", "pope", "--data", str(world), "--methods", "none", "fastvv", *base], capsys)
    assert "unknown method 'fastvv'" in err

    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    (images / "000002.png").unlink()
    pope = tmp_path / "pope"
    pope.mkdir()
    shutil.copy(world / "coco_pope_random.json", pope)
    real = ["eval", "pope", "--image-dir", str(images), "--pope-dir", str(pope), *base]
    err = _fails([*real, "--splits", "random"], capsys)
    assert "coco_pope_random.json: question_id 7: image '000002.png' not found in" in err
    (pope / "coco_pope_random.json").write_text("")
    assert "empty file, no POPE questions" in _fails([*real, "--splits", "random"], capsys)
    (pope / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "000001.png", "text": "Is there a dog?", "label": "yes"}\n{"question_id": 2,\n')
    assert "coco_pope_random.json:2: not valid JSON" in _fails([*real, "--splits", "random"], capsys)
    err = _fails([*real, "--splits", "popular"], capsys)
    assert "coco_pope_popular.json: POPE questions of split 'popular' not found" in err

    captions = json.loads((world / "captions.json").read_text())
    captions["images"].append({"id": 99, "file_name": "000099.png"})
    captions["annotations"].append({"id": 999, "image_id": 99, "caption": "A dog."})
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    err = _fails(["eval", "chair", "--image-dir", str(world / "images"), "--instances", str(world / "instances.json"),
                  "--captions", str(tmp_path / "captions.json"), "--n-images", "2", *base], capsys)
    assert "captions of 1 image(s) absent from the instances annotations" in err and "first image_id 99" in err
    err = _fails(["eval", "chair", "--data", str(world), "--n-images", "9", *base], capsys)
    assert "n_images is 9 but" in err and "has 4 images" in err and "--n-images 4 or fewer" in err
    err = _fails(["eval", "pope", "--data", str(world), "--limit", "25", "--splits", "random", *base], capsys)
    assert "limit is 25 but" in err and "has 24 questions" in err and "--limit 24 or fewer" in err
    (tmp_path / "ids.json").write_text("[1, 3, 1]")
    err = _fails(["eval", "chair", "--data", str(world), "--image-ids", str(tmp_path / "ids.json"), *base], capsys)
    assert "chair: item id '1' occurs twice" in err


def test_chair_without_n_images_takes_every_image_up_to_500(world, tmp_path, capsys):
    out = tmp_path / "out"
    err = _fails(["eval", "chair", "--data", str(world), "--model", "no-such-model", "--out", str(out)], capsys)
    assert "cannot find model 'no-such-model'" in err and "n_images" not in err  # it got as far as the model
    assert json.loads((out / "chair_image_ids.json").read_text())["image_ids"] == [1, 2, 3, 4]
    config = {"image_ids": None, "n_images": None, "seed": 0}
    ids = _chosen_ids(config, list(range(1, 701)), "x")
    assert len(ids) == 500 and ids == _chosen_ids({**config, "n_images": 500}, list(range(1, 701)), "x")
    with pytest.raises(ValueError, match=r"n_images is 5 but x has 4 images: pass --n-images 4 or fewer \(or leave "
                       r"it out for all of them, at most 500\)"):
        _chosen_ids({**config, "n_images": 5}, [1, 2, 3, 4], "x")


def test_an_unwritable_out_is_one_error_line(world, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = ["--out", str(tmp_path / "file" / "out")]
    model = ["--model", "no-such-model"]
    for argv in (["eval", "pope", "--data", str(world), *model], ["eval", "chair", "--data", str(world), *model],
                 ["sinks", *model], ["generate", *model], ["world"], ["demo"], ["demo", "results"],
                 ["demo", "train"], ["compare", "--tasks", "pope"]):
        err = _fails([*argv, *out], capsys)
        said = err.splitlines()[-1]  # (after a progress line or none)
        assert said.startswith("vlmfix: error: ") and err.count("vlmfix: error") == 1 and "Traceback" not in err
        assert "/file" in said and ("Not a directory" in said or "a file, not a folder" in said), (argv, err)


# ------------------------------------------------------------------------------- with SmolLM2


def _implementations(model) -> tuple:
    return model.config._attn_implementation, model.config.text_config._attn_implementation


@pytest.mark.smollm2
def test_several_method_sets_in_one_run_and_instant_resume(small_smol_llava, world, tmp_path, capsys, one_thread):
    model, processor = small_smol_llava
    before = _implementations(model)
    specs = ["none", "var", "gift", "var,gift"]
    config = load_config("pope", None, {"model": "smollm2-llava-small", "world": str(world), "splits": ["random"],
                                        "limit": 4, "methods": specs, "batch_size": 2, "max_new_tokens": 4,
                                        "out": str(tmp_path / "out")})
    results = run("pope", config, model, processor)
    assert _implementations(model) == before  # each method set was detached after its part
    assert list(results["results"]) == specs
    out = tmp_path / "out"
    for label in ("none", "var", "gift", "var+gift"):
        assert [r["id"] for r in _lines(out / f"{label}.jsonl")] == [f"random/{i}" for i in range(1, 5)]
    for spec, scores in results["results"].items():
        assert scores["rule"] == "reference" and scores["splits"]["random"]["n"] == 4
        assert 0 <= scores["mean"]["f1"] <= 1
    sets = results["config"]["method_sets"]
    assert sets["none"]["methods"] == [] and sets["var"]["sink_dims"] == [507]
    assert sets["var"]["methods"][0]["params"]["rho"] == 0.5
    assert sets["var,gift"]["methods"][1]["params"]["boost_layers"]  # resolved at attach
    assert results["config"]["versions"]["transformers"] and results["config"]["prompt"] == config["prompt"]
    md = (out / "results.md").read_text()
    assert "| var,gift |" in md and "'reference' rule" in md and "## gift" in md

    again = run("pope", config, model, processor)  # everything is done: nothing is generated again
    assert "pope var,gift: 4 of 4 items done, 0 to generate" in capsys.readouterr().err
    assert again["results"] == results["results"]
    with pytest.raises(ValueError, match="another max_new_tokens"):
        run("pope", {**config, "max_new_tokens": 5}, model, processor)


@pytest.mark.smollm2
def test_prepared_ahead_on_threads_gives_the_same_records(small_smol_llava, world, tmp_path, one_thread):
    model, processor = small_smol_llava
    outputs = {}
    for workers in (0, 2):
        config = load_config("pope", None, {"model": "smollm2-llava-small", "world": str(world), "splits": ["random"],
                                            "limit": 6, "methods": ["none"], "batch_size": 2, "max_new_tokens": 4,
                                            "prep_workers": workers, "out": str(tmp_path / f"w{workers}")})
        run("pope", config, model, processor)
        outputs[workers] = _lines(tmp_path / f"w{workers}" / "none.jsonl")
    assert len(outputs[0]) == 6 and outputs[2] == outputs[0]
    with pytest.raises(ValueError, match="prep_workers must be null"):
        load_config("pope", None, {"prep_workers": -1})


@pytest.mark.smollm2
def test_chair_run_saves_the_image_ids(small_smol_llava, world, tmp_path, one_thread):
    model, processor = small_smol_llava
    config = load_config("chair", None, {"model": "smollm2-llava-small", "world": str(world), "n_images": 2,
                                         "methods": ["none"], "batch_size": 2, "max_new_tokens": 8,
                                         "out": str(tmp_path / "out")})
    results = run("chair", config, model, processor)
    saved = json.loads((tmp_path / "out" / "chair_image_ids.json").read_text())
    assert saved["seed"] == 0 and len(saved["image_ids"]) == 2
    assert results["config"]["image_ids"] == saved["image_ids"]
    scores = results["results"]["none"]
    assert all(0 <= scores[k] <= 1 for k in ("CHAIRs", "CHAIRi", "Recall")) and scores["counts"]["captions"] == 2
    assert [s["image_id"] for s in scores["sentences"]] == saved["image_ids"]
    assert "| none |" in (tmp_path / "out" / "results.md").read_text()
    reuse = run("chair", {**config, "n_images": None, "image_ids": str(tmp_path / "out" / "chair_image_ids.json")},
                model, processor)
    assert reuse["results"]["none"]["CHAIRs"] == scores["CHAIRs"]


def _pope_script(out: Path, world: Path) -> list[str]:
    return [sys.executable, str(ROOT / "evals" / "pope.py"), *SMALL_RUN, "--data", str(world), "--out", str(out)]


def _table(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["results"]


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> Path:
    """The output folder of an uninterrupted 1-process run of evals/pope.py."""
    out = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_pope_script(out, world), env=ENV, check=True, capture_output=True, timeout=300)
    return out


@pytest.mark.smollm2
def test_killed_run_resumes_to_the_same_table(world, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_pope_script(out, world), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jsonl, deadline = out / "none.jsonl", time.monotonic() + 240
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any result was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(jsonl, "a") as f:
        f.write('{"id": "random/8", "split": "ran')  # as if killed in the middle of a write
    done = jsonl.read_text().count("\n")
    assert 2 <= done < N_ITEMS

    resumed = subprocess.run(_pope_script(out, world), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"pope none: {done} of {N_ITEMS} items done, {N_ITEMS - done} to generate" in resumed.stderr
    ids = [r["id"] for r in _lines(jsonl)]
    assert ids == [f"random/{i}" for i in range(1, N_ITEMS + 1)]  # each once, in item order
    assert _table(out) == _table(uninterrupted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.smollm2
def test_two_processes_give_the_same_table(world, uninterrupted, tmp_path):
    out = tmp_path / "out"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    done = subprocess.run([*launch, *_pope_script(out, world)[1:]], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for rank in (0, 1):
        assert f"pope none [process {rank}/2]: 0 of {N_ITEMS // 2} items done" in done.stderr
    assert json.loads((out / "results.json").read_text())["config"]["num_processes"] == 2
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["none.jsonl"]  # shards merged and removed
    assert _lines(out / "none.jsonl") == _lines(uninterrupted / "none.jsonl")
    assert _table(out) == _table(uninterrupted)


# ------------------------------------------------------------------------------- with the demo VLM


@pytest.fixture(scope="module")
def demo():
    from vlmfix import load_demo

    return load_demo()


def _demo_pope(world: Path, out: Path, **overrides) -> dict:
    return load_config("pope", None, {"model": "demo", "world": str(world), "splits": ["random"], "limit": 2,
                                      "methods": ["none"], "batch_size": 2, "max_new_tokens": 2, "out": str(out),
                                      **overrides})


def test_a_rerun_on_other_data_is_refused_and_one_on_the_same_data_resumes(demo, tmp_path, capsys, one_thread):
    world, out = tmp_path / "world", tmp_path / "out"
    generate_world(world, 4, seed=0)
    config = _demo_pope(world, out)
    first = run("pope", config, *demo)
    shutil.rmtree(world)
    generate_world(world, 4, seed=0)  # the same world written again: same bytes, newer files
    assert run("pope", config, *demo)["results"] == first["results"]
    assert "pope none: 2 of 2 items done, 0 to generate" in capsys.readouterr().err

    shutil.rmtree(world)
    generate_world(world, 4, seed=3)  # another world in the same place (as `vlmfix world --overwrite` writes it)
    with pytest.raises(ValueError, match=r"holds results of 'none' for 2 item\(s\) whose data changed since \(first "
                       r"'random/1': its question, label, prompt or image differs\); rerun with --restart to discard "
                       r"them and start afresh, or choose another --out"):
        run("pope", config, *demo)
    run("pope", config, *demo, restart=True)
    assert "pope none: 0 of 2 items done, 2 to generate" in capsys.readouterr().err
    questions = (world / "coco_pope_random.json").read_text().splitlines()
    assert [r["prompt"].split("\n")[0] for r in _lines(out / "none.jsonl")] == \
        [json.loads(q)["text"] for q in questions[:2]]

    run("pope", {**config, "limit": 3}, *demo)  # more items: the finished ones are kept
    assert "pope none: 2 of 3 items done, 1 to generate" in capsys.readouterr().err

    flipped = {**json.loads(questions[1]), "label": "no" if json.loads(questions[1])["label"] == "yes" else "yes"}
    (world / "coco_pope_random.json").write_text("\n".join([questions[0], json.dumps(flipped), *questions[2:]]) + "\n")
    with pytest.raises(ValueError, match=r"for 1 item\(s\) whose data changed since \(first 'random/2'"):
        run("pope", config, *demo)  # a label alone changed


def test_what_each_method_did_is_counted_and_a_method_that_never_acted_is_named(demo, world, tmp_path, capsys,
                                                                                one_thread):
    out = tmp_path / "out"
    results = run("pope", _demo_pope(world, out, methods=["var", "fastv:quarter"]), *demo)
    sets = results["config"]["method_sets"]
    assert sets["var"]["acted"] == {"var": {"what": "items where var moved attention", "items": 0, "of": 2}}
    assert sets["fastv:quarter"]["acted"]["fastv"]["items"] == 2  # it pruned image tokens on every item
    warning = "method set `var`: var acted on no item (items where var moved attention: 0 of 2)"
    assert results["warnings"] == [warning]
    captured = capsys.readouterr()
    assert f"**Warning**: {warning}" in captured.out and f"vlmfix: warning: {warning}" in captured.err
    assert f"**Warning**: {warning}" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["warnings"] == [warning]
    assert [r["acted"] for r in _lines(out / "var.jsonl")] == [{"var": False}] * 2


def test_ctrl_c_ends_an_eval_with_one_line_saying_how_to_resume(world, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "vlmfix", "eval", "pope", "--data", str(world), "--out", str(out), "--splits",
               "random", "--limit", "24", "--methods", "none", "--batch-size", "1", "--max-new-tokens", "2"]
    proc = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    jsonl, deadline = out / "none.jsonl", time.monotonic() + 120
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before any result was written"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("vlmfix: interrupted; rerun the same command to resume: finished items "
                                            "are kept")
    assert 1 <= len(_lines(jsonl)) < 24
