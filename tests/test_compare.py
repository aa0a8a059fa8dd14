"""`vlmfix compare` (vlmfix.eval.compare, vlmfix.eval.report): a 2 x 2 grid on the demo VLM over a 6-image world
end to end (report files, intervals, paired tests), resumed after a kill without recomputing finished cells; a
sweep of two settings; a failing cell recorded while the others run; and the NAME.PARAM=VALUE settings of
compare, eval and generate refused with what exists."""

from __future__ import annotations

import json

import pytest
import torch

from vlmfix.cli.main import main
from vlmfix.eval import runner
from vlmfix.eval.compare import load_grid, run_grid


@pytest.fixture(scope="module")
def demo():
    from vlmfix import load_demo

    return load_demo()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlmfix.data.world import generate_world

    path = tmp_path_factory.mktemp("compare") / "world"
    generate_world(path, 6, seed=0)
    return path


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Killed(BaseException):
    """What a kill looks like to the grid: not an error it may record and go past."""


def _grid(world, out, **kw):
    return load_grid(None, {"data": {"world": str(world)}, "tasks": ["pope:random", "chair"],
                            "methods": ["none", "fastv:quarter"], "limit": 3, "n_images": 2, "max_new_tokens": 6,
                            "batch_size": 3, "draws": 1000, "out": str(out), **kw})


def test_a_2x2_grid_end_to_end_resumes_after_a_kill_without_recomputing(demo, world, tmp_path, monkeypatch,
                                                                         one_thread):
    generated: list[int] = []
    real = runner.generate_prepared
    kill_at = [3]  # the third batch: the first cell of the second task

    def counting(model, processor, inputs, max_new_tokens):
        if len(generated) + 1 == kill_at[0]:
            raise Killed()
        generated.append(inputs["input_ids"].shape[0])
        return real(model, processor, inputs, max_new_tokens)

    monkeypatch.setattr(runner, "generate_prepared", counting)
    grid = _grid(world, tmp_path / "out")
    assert len(grid.cells()) == 4
    with pytest.raises(Killed):
        run_grid(grid, loader=lambda name, dtype: demo)
    assert generated == [3, 3]  # the two POPE cells finished
    finished = sorted((tmp_path / "out").rglob("cell.json"))
    assert len(finished) == 2
    stamps = {p: p.stat().st_mtime_ns for p in finished}

    kill_at[0] = 0
    report = run_grid(grid, loader=lambda name, dtype: demo)
    assert generated == [3, 3, 2, 2]  # only the two CHAIR cells ran
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    rows = {(r["task"], r["method_set"]): r for r in report["cells"]}
    assert rows[("pope:random", "none")]["resumed"] and not rows[("chair", "none")]["resumed"]
    assert all(r["status"] == "done" for r in rows.values())
    for r in rows.values():  # every metric has its interval around its value
        for m in r["metrics"].values():
            assert m["low"] <= m["value"] <= m["high"]
    assert set(rows[("chair", "none")]["metrics"]) >= {"CHAIR_s", "CHAIR_i", "CHAIR_i per 100 words", "Recall", "Len"}
    pope_test = rows[("pope:random", "fastv:quarter")]["against"]["accuracy"]
    assert pope_test["test"] == "McNemar exact" and sum(pope_test["table"]) == 3 and "p_holm" in pope_test
    assert rows[("chair", "fastv:quarter")]["against"]["CHAIR_i"]["test"] == "paired bootstrap"
    out = tmp_path / "out"
    for name in ("report.md", "report.json", "metrics.png", "frontier.png", "speed.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "max_new_tokens 6" in text and "[" in text and "Holm" in text and "vlmfix 0." in text
    timing = json.loads((out / "report.json").read_text())["timing"]
    assert timing["cells_seconds"] > 0 and timing["earlier_cells"] == 2 and timing["earlier_cells_seconds"] > 0
    assert "2 cells were finished by earlier invocations" in text
    from vlmfix.eval.report import markdown

    saved = json.loads((out / "report.json").read_text())
    entry = next(iter(next(r for r in saved["cells"] if r.get("against"))["against"].values()))
    entry.update(p=1 / saved["draws"], p_holm=0.01, p_bound=True)  # a bootstrap p of 0: below the draws' resolution
    assert f"| < {1 / saved['draws']:.3g} | < 0.01 |" in markdown(saved)


def test_a_sweep_of_two_settings_runs_each_combination_once(demo, world, tmp_path, one_thread):
    grid = load_grid(None, {"data": {"world": str(world)}, "tasks": ["pope:random"], "methods": ["none", "var"],
                            "sweep": ["var.p=0.2,0.6", "tau=15,20"], "limit": 1, "batch_size": 1, "draws": 1000,
                            "out": str(tmp_path / "sweep")})
    cells = grid.cells()
    assert [c.name for c in cells] == ["none", "var [var.p=0.2 tau=15]", "var [var.p=0.2 tau=20]",
                                       "var [var.p=0.6 tau=15]", "var [var.p=0.6 tau=20]"]
    report = run_grid(grid, loader=lambda name, dtype: demo)
    rows = {r["name"]: r for r in report["cells"]}
    assert rows["var [var.p=0.6 tau=15]"]["methods"][0]["params"]["p"] == 0.6
    assert rows["var [var.p=0.6 tau=15]"]["tau"] == 15
    assert sum(bool(r.get("frontier")) for r in report["cells"]) >= 1
    assert "var [var.p=0.2 tau=20]" in (tmp_path / "sweep" / "report.md").read_text()


def test_a_failing_cell_is_recorded_and_the_others_run(world, tmp_path):
    def loader(name, dtype):
        if name == "broken":
            raise ValueError("no such model")
        raise AssertionError("only the broken model is loaded here")

    grid = load_grid(None, {"data": {"world": str(world)}, "tasks": ["pope:random"], "methods": ["none"],
                            "models": ["broken"], "limit": 2, "out": str(tmp_path / "failed")})
    report = run_grid(grid, loader=loader)
    assert [r["status"] for r in report["cells"]] == ["failed"]
    assert "no such model" in report["cells"][0]["error"]
    assert "no such model" in (tmp_path / "failed" / "report.md").read_text()


def test_settings_are_validated_everywhere_before_anything_runs(tmp_path, capsys):
    for argv in (["compare", "--tasks", "pope", "--sweep", "var.nope=1,2", "--out", str(tmp_path / "a")],
                 ["eval", "pope", "--set", "var.nope=1", "--out", str(tmp_path / "b")],
                 ["generate", "--set", "var.nope=1", "--out", str(tmp_path / "c")]):
        assert main(argv) == 2
        said = capsys.readouterr().err
        assert "var has no parameter 'nope'" in said and "rho" in said, said
    assert main(["compare", "--tasks", "pope", "--set", "nomethod.p=1", "--out", str(tmp_path / "d")]) == 2
    assert "available: " in capsys.readouterr().err
    assert main(["compare", "--tasks", "lmms:mme", "--out", str(tmp_path / "e")]) == 2
    assert "unknown task 'lmms:mme'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fixed_and_swept_settings_name_the_cells_that_they_concern(tmp_path):
    grid = load_grid(None, {"tasks": ["chair"], "methods": ["none", "var", "gift"], "settings": ["var.p=0.4"],
                            "sweep": ["gift.alpha=1,3"], "out": str(tmp_path)})
    assert [c.name for c in grid.cells()] == ["none", "var [var.p=0.4]", "gift [gift.alpha=1]", "gift [gift.alpha=3]"]
    assert grid.cells()[1].method_settings() == {"var": {"p": 0.4}}
    with pytest.raises(ValueError, match="tau is given twice"):
        load_grid(None, {"tasks": ["chair"], "methods": ["var"], "settings": ["tau=15"], "tau": 20})
    with pytest.raises(ValueError, match="swept twice"):
        load_grid(None, {"tasks": ["chair"], "sweep": ["var.p=0.2", "var.p=0.4"]})
    with pytest.raises(ValueError, match="baseline 'pai' is not one of"):
        load_grid(None, {"tasks": ["chair"], "methods": ["none", "var"], "baseline": "pai"})


def test_eval_settings_reach_the_method_sets_and_tau_the_runner():
    from vlmfix.eval.tasks import config_tau, load_config, method_settings

    config = load_config("pope", None, {"methods": ["none", "var", "var,gift"], "settings": ["var.p=0.3", "tau=12"]})
    sets = runner.parse_method_sets(config["methods"], method_settings(config))
    assert [m.p for s in sets for m in s.methods if m.name == "var"] == [0.3, 0.3]
    assert config_tau(config) == 12
    assert config_tau(load_config("pope", None, {"tau": 9})) == 9
    with pytest.raises(ValueError, match="must be"):  # a value the method refuses
        runner.parse_method_sets(["var"], {"var": {"p": 7}})


def test_a_crowded_scatter_numbers_its_points_and_keys_them(tmp_path):
    """Past `NAMED_POINTS` points a scatter panel writes numbers beside the points and a key of the names under the
    panel (taller image); with few points, the names stand beside the points."""
    from vlmfix.eval.report_plots import NAMED_POINTS, Panel, Point, scatter

    def panel(n: int) -> Panel:
        return Panel("t", "x", "y", [Point(f"method {i}", float(i % 3), float(i // 3)) for i in range(n)])

    few = scatter([panel(NAMED_POINTS)], tmp_path / "few.png", "title", "legend")
    many = scatter([panel(NAMED_POINTS + 12)], tmp_path / "many.png", "title", "legend")
    from PIL import Image

    assert Image.open(many).height > Image.open(few).height  # the key's rows
