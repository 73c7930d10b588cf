"""The capstone leaderboard: records, fingerprints, ranking, costs, published numbers, CLI."""

import importlib.metadata
import json
import shutil
from types import SimpleNamespace

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from course_lib import config, leaderboard, viz  # noqa: E402
from course_lib.published import VIT_B32_TASKS, vit_b32_table  # noqa: E402

TASKS = ["a", "b"]


def _record(track="vision", fingerprint="fp", **over) -> leaderboard.TrackResult:
    absolute = {
        "zero-shot": {"a": 20.0, "b": 40.0},
        "experts": {"a": 80.0, "b": 100.0},
        "task arithmetic": {"a": 40.0, "b": 80.0},
        "TIES-Merging": {"a": 60.0, "b": 70.0},
        "Twin-Merging": {"a": 76.0, "b": 100.0},
    }
    fields = dict(
        track=track, profile="mini", metric="accuracy", absolute=absolute,
        experts=absolute["experts"], chosen={"task arithmetic": 0.3}, seconds={"experts": 2.0},
        stored={m: 1.0 for m in absolute} | {"experts": 2.0, "Twin-Merging": 1.4},
        notes={}, fingerprint=fingerprint,
    )  # fmt: skip
    fields.update(over)
    return leaderboard.TrackResult(**fields)


def test_normalized_means_by_hand():
    r = _record()
    assert r.normalized()["task arithmetic"] == {"a": 50.0, "b": 80.0}
    assert r.mean("task arithmetic") == 60.0
    assert r.mean("task arithmetic", norm=True) == 65.0
    assert r.mean("experts", norm=True) == 100.0


def test_board_ranks_merges_by_normalized_mean_and_leaves_references_unranked():
    rows = {row["method"]: row for row in leaderboard.board([_record()])}
    # normalized means: Twin (95+100)/2 = 97.5, TIES (75+70)/2 = 72.5, TA 65
    assert [rows[m]["rank"] for m in ("Twin-Merging", "TIES-Merging", "task arithmetic")] == [
        1,
        2,
        3,
    ]
    assert rows["experts"]["rank"] == rows["zero-shot"]["rank"] == "-"
    assert rows["experts"]["kind"] == "reference"
    assert rows["Twin-Merging"]["kind"] == "router + merge per input"
    assert rows["TIES-Merging"]["kind"] == "one merged model"
    assert rows["Twin-Merging"]["stored (models)"] == 1.4
    assert rows["experts"]["time (s)"] == 2.0
    llm_rows = leaderboard.board([_record("llm")])
    assert {r["kind"] for r in llm_rows if r["method"] == "Twin-Merging"} == {
        "router + merge per group"
    }


def test_save_and_load_round_trip_and_refuse_stale_or_broken_files(tmp_path):
    r = _record(fingerprint="one")
    path = leaderboard.save(r, tmp_path / "x.json")
    assert leaderboard.load(path, "one") == r
    assert leaderboard.load(path, "two") is None  # other code or world: recompute
    assert leaderboard.load(tmp_path / "missing.json") is None
    path.write_text('{"track": "vision"')  # a torn write
    assert leaderboard.load(path) is None
    path.write_text(json.dumps({"track": "vision"}))  # an old format
    assert leaderboard.load(path) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_source_digest_changes_when_any_module_changes(tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(leaderboard.PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = leaderboard.source_digest(pkg)
    assert before == leaderboard.source_digest(pkg)
    ties = pkg / "merging" / "ties.py"
    ties.write_text(ties.read_text() + "\n# one more line\n")
    changed = leaderboard.source_digest(pkg)
    assert changed != before
    viz = pkg / "viz.py"  # a plotting module cannot change a number
    viz.write_text(viz.read_text() + "\n# a nicer colour\n")
    assert leaderboard.source_digest(pkg) == changed
    assert leaderboard.source_digest() == leaderboard.source_digest(leaderboard.PACKAGE)


def test_fingerprint_names_track_profile_world_code_and_device(monkeypatch):
    fp = leaderboard.fingerprint("vision", "mini")
    assert fp.startswith("vision:mini:") and leaderboard.source_digest() in fp
    transformers = importlib.metadata.version("transformers")
    assert fp.endswith(f"torch {torch.__version__}, transformers {transformers} on cpu")
    assert leaderboard.fingerprint("llm", "mini") != fp
    monkeypatch.setenv("COURSE_DEVICE", "cuda")  # results computed on a GPU are kept apart
    assert leaderboard.fingerprint("vision", "mini") == fp.replace(" on cpu", " on cuda")
    with pytest.raises(ValueError, match="track must be one of"):
        leaderboard.world_id("audio", "mini")


def test_track_results_reuses_a_matching_file_and_recomputes_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "RESULTS_DIR", tmp_path)
    fp = leaderboard.fingerprint("vision", "mini")
    leaderboard.save(_record(fingerprint=fp))
    calls = []

    def fake_run(track):
        calls.append(track)
        raise RuntimeError("computing")

    monkeypatch.setattr("course_lib.models.zoo.load_zoo", lambda *a, **k: fake_run("vision"))
    said = []
    assert leaderboard.track_results("vision", "mini", log=said.append).fingerprint == fp
    assert calls == []
    leaderboard.save(_record(fingerprint="stale"))
    with pytest.raises(RuntimeError, match="computing"):
        leaderboard.track_results("vision", "mini", log=said.append)
    assert said == [
        "vision track: reused mini_vision.json",
        "vision track: computing (a few minutes) mini_vision.json",
    ]
    leaderboard.save(_record(fingerprint=fp))
    with pytest.raises(RuntimeError, match="computing"):
        leaderboard.track_results("vision", "mini", recompute=True)
    assert calls == ["vision", "vision"]

    def run_all(zoo, progress):
        return fake_run(f"run_all on {zoo.profile}")

    monkeypatch.setattr("course_lib.experiments.run_all", run_all)
    loaded = SimpleNamespace(profile="mini")  # a zoo the caller has loaded is not loaded again
    with pytest.raises(RuntimeError, match="computing"):
        leaderboard.track_results("vision", "mini", recompute=True, zoo=loaded)
    assert calls[-1] == "run_all on mini"
    with pytest.raises(ValueError, match="profile 'mini', not 'full'"):
        leaderboard.track_results("vision", "full", recompute=True, zoo=loaded)


def test_results_of_another_zoo_are_neither_reused_nor_saved(tmp_path, monkeypatch):
    from course_lib.models import llm
    from course_lib.models.lora import LoraSpec
    from course_lib.models.zoo import ZooConfig

    monkeypatch.setattr(config, "RESULTS_DIR", tmp_path)
    course = leaderboard.fingerprint("vision", "mini")
    leaderboard.save(_record(fingerprint=course))
    saved = leaderboard.results_path("vision", "mini").read_text()
    computed = _record(fingerprint="from another zoo")
    monkeypatch.setattr("course_lib.experiments.run_all", lambda zoo, progress: "results")
    monkeypatch.setattr(leaderboard, "vision_record", lambda res, zoo: computed)
    other = SimpleNamespace(profile="mini", world="a smaller config")
    said = []
    assert leaderboard.track_results("vision", "mini", zoo=other, log=said.append) is computed
    assert said == ["vision track: computing, not saved (not the course's zoo) mini_vision.json"]
    assert leaderboard.results_path("vision", "mini").read_text() == saved  # the course's kept
    ours = SimpleNamespace(profile="mini", world=ZooConfig().digest())
    assert leaderboard.track_results("vision", "mini", zoo=ours).fingerprint == course
    # a record carries the world of the zoo it was computed on
    assert leaderboard.world_of(other) == "a smaller config"
    assert leaderboard.world_of(SimpleNamespace(profile="mini")) == "unknown"
    assert "a smaller config" in leaderboard.fingerprint("vision", "mini", "a smaller config")
    # the LLM world: base model + LoRA recipe, and the task sizes when they are not the defaults
    assert llm.world(LoraSpec()) == leaderboard.world_id("llm", "mini")
    assert llm.world(LoraSpec(), {"qa": 8}) != leaderboard.world_id("llm", "mini")


def test_vision_record_counts_storage_in_models():
    pre = {"w": torch.zeros(10, 10), "b": torch.zeros(100), "ids": torch.arange(5)}
    zoo = SimpleNamespace(pretrained=pre, task_names=["a", "b"], profile="mini")
    twin = SimpleNamespace(stored_params=50, router_params=10, router_accuracy=90.0,
                           compression=0.25, rank_ratio=0.1)  # fmt: skip
    rec = _record()
    res = SimpleNamespace(absolute=rec.absolute, experts=rec.experts, chosen={}, seconds={},
                          twin=twin)  # fmt: skip
    out = leaderboard.vision_record(res, zoo)
    assert out.stored["experts"] == 2.0 and out.stored["task arithmetic"] == 1.0
    assert out.stored["Twin-Merging"] == pytest.approx(1.0 + 60 / 200)  # int buffer not counted
    assert out.notes["router accuracy (%)"] == 90.0 and out.notes["twin rank ratio"] == 0.1
    # `python -m course_lib course` prints its tables from such a record and a negation run
    from course_lib.__main__ import results_markdown
    from course_lib.experiments import NegationResult

    neg = NegationResult("b", 0.5, {"a": 50.0, "b": 40.0}, {"a": 47.5, "b": 5.0})
    text = results_markdown(out, neg)
    assert "rank ratio 0.1 (stored/dense parameters 0.250), router accuracy 90.0%" in text
    assert "takes b from 40.0% to 5.0%; the largest drop on another task is 2.5 points." in text
    assert "No λ tried" not in text
    neg.within_tolerance = False  # no lambda kept the other tasks within 5 points on val
    assert "No λ tried kept every other task within 5 points of θ0" in results_markdown(out, neg)


def test_llm_record_counts_lora_factors_and_twin():
    model = torch.nn.Linear(10, 10, bias=False)  # 100 parameters
    lora = SimpleNamespace(factors={"w": (torch.zeros(2, 10), torch.zeros(10, 2))})
    zoo = SimpleNamespace(model=model, loras={"a": lora, "b": lora}, profile="mini")
    router = torch.nn.Linear(3, 2)  # 8 parameters
    twin = SimpleNamespace(compressed=[SimpleNamespace(stored_params=12)] * 2, router=router,
                           compression=0.3)  # fmt: skip
    absolute = {"base model": {"a": 0.0}, "LoRA experts": {"a": 50.0}, "Twin-Merging": {"a": 50.0}}
    res = SimpleNamespace(absolute=absolute, experts={"a": 50.0}, chosen={},
                          seconds={"Twin-Merging": 1.234}, twin=twin,
                          twin_run=SimpleNamespace(router_accuracy=100.0))  # fmt: skip
    out = leaderboard.llm_record(res, zoo)
    assert out.stored["LoRA experts"] == pytest.approx(1.0 + 80 / 100)
    assert out.stored["Twin-Merging"] == pytest.approx(1.0 + 32 / 100)
    assert out.seconds == {"Twin-Merging": 1.2}
    assert out.notes == {"twin compression": 0.3, "router accuracy (%)": 100.0}


def test_published_table_matches_the_papers_averages():
    """The reference's Avg column (AdaMerging / PCB tables) and its derived normalized means."""
    table = vit_b32_table()
    avg = {m: sum(r.values()) / 8 for m, r in table.items()}
    published = {"zero-shot": 48.0, "experts": 90.5, "weight averaging": 65.8,
                 "task arithmetic": 69.1, "TIES-Merging": 72.4, "PCB-Merging": 76.3}  # fmt: skip
    for m, v in published.items():
        assert abs(avg[m] - v) <= 0.1, m
    comp = leaderboard.published_comparison(None)
    derived = {"zero-shot": 54.7, "weight averaging": 73.1, "task arithmetic": 75.8,
               "TIES-Merging": 79.6, "PCB-Merging": 84.2}  # fmt: skip
    for m, v in derived.items():
        assert abs(comp[m]["ViT-B/32 (published)"] - v) <= 0.1, m
    assert list(table["experts"]) == list(VIT_B32_TASKS)


def test_markdown_labels_published_numbers_and_lists_every_row():
    text = leaderboard.leaderboard_markdown([_record(), _record("llm")])
    assert text.count("| Twin-Merging |") >= 2
    assert "published" in text and "WUDI-Merging" in text
    assert "| vision | 1 | Twin-Merging | router + merge per input |" in text
    comp = leaderboard.published_comparison(_record())
    assert comp["task arithmetic"]["mini (ours)"] == 65.0
    assert comp["Twin-Merging"] == {"mini (ours)": 97.5}


def test_figures_are_written(tmp_path):
    paths = leaderboard.figures([_record(), _record("llm")], tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        ["heatmap_vision.png", "radar_vision.png", "heatmap_llm.png", "radar_llm.png", "costs.png"]
    )
    assert all(p.stat().st_size > 5000 for p in paths)


def test_radar_and_cost_scatter_axes():
    fig = viz.radar({"m1": {"a": 10, "b": 20, "c": 30}, "m2": {"a": 1, "b": 2, "c": 3}})
    ax = fig.axes[0]
    assert ax.name == "polar" and len(ax.get_lines()) == 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    points = {("vision", "TA"): (1.0, 50.0), ("vision", "TIES"): (1.0, 51.0),
              ("llm", "Twin"): (1.2, 99.0)}  # fmt: skip
    fig = viz.cost_scatter(points)
    assert [ax.get_title() for ax in fig.axes] == ["vision track", "llm track"]
    assert all(ax.get_xscale() == "log" for ax in fig.axes)
    labels = {t.get_text(): t.xyann for t in fig.axes[0].texts}
    assert set(labels) == {"TA", "TIES"} and {t.get_text() for t in fig.axes[1].texts} == {"Twin"}
    assert abs(labels["TIES"][1] - labels["TA"][1]) >= 5.5  # close points: labels kept apart


def test_spread_keeps_a_minimum_gap_and_the_order():
    assert viz._spread([10.0, 0.0, 11.0], gap=5.0) == [10.0, 0.0, 15.0]


def test_cli_prints_and_writes_the_leaderboard_from_saved_results(tmp_path, monkeypatch, capsys):
    from course_lib import __main__ as cli

    monkeypatch.setattr(config, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(cli, "RESULTS_DIR", tmp_path)
    monkeypatch.setenv("COURSE_PROFILE", "mini")
    for track in leaderboard.TRACKS:
        leaderboard.save(_record(track, leaderboard.fingerprint(track, "mini")))
    assert cli.main(["leaderboard"]) == 0
    out = capsys.readouterr().out
    assert "vision track: reused mini_vision.json" in out
    assert "| llm | 1 | Twin-Merging |" in out
    assert (tmp_path / "leaderboard.md").read_text().startswith("## Leaderboard")
    assert (tmp_path / "figures" / "costs.png").exists()


def test_pareto_front_by_hand():
    points = {"avg": (1.0, 40.0), "ta": (1.0, 45.0), "twin": (2.5, 85.0), "experts": (8.0, 100.0)}
    assert leaderboard.pareto_front(points) == ["ta", "twin", "experts"]
    assert leaderboard.pareto_front({"a": (1, 5), "b": (1, 5)}) == ["a", "b"]  # ties survive
    assert leaderboard.pareto_front({}) == []


def test_best_under_budget_by_hand():
    rows = leaderboard.board([_record()])
    assert leaderboard.best_under_budget(rows, "vision", 1.0) == "TIES-Merging"
    assert leaderboard.best_under_budget(rows, "vision", 1.5) == "Twin-Merging"
    assert leaderboard.best_under_budget(rows, "vision", 0.5) is None
    assert leaderboard.best_under_budget(rows, "llm", 10.0) is None
