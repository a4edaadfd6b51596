"""`graft search`: trials on the tiny random backbone, outputs, resume, bad spaces, failed trials."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from graftnet import config, search
from graftnet.cli import main
from graftnet.errors import ConfigError
from graftnet.run import read_history

from .conftest import tiny_overrides

SPACE = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
         "head.hidden": {"type": "layers", "low": 0, "high": 1, "choices": [16, 32]},
         "train.epochs": {"type": "int", "low": 2, "high": 3}}


def base(image_folder, tmp_path, **extra):
    return config.resolve(None, tiny_overrides(image_folder, tmp_path, **extra))


def test_search_writes_results_and_scores_only_the_best(image_folder, tmp_path):
    folder = tmp_path / "s"
    summary = search.run_search(base(image_folder, tmp_path), SPACE, folder, trials=4)
    for name in ("trials.csv", "trials.json", "best.yaml", "search.json", "base.yaml", "space.yaml"):
        assert (folder / name).is_file(), name
    rows = json.loads((folder / "trials.json").read_text())
    assert [r["number"] for r in rows] == [0, 1, 2, 3]
    assert len(list(csv.DictReader((folder / "trials.csv").open()))) == 4
    done = [r for r in rows if r["state"] == "COMPLETE"]
    best = max(done, key=lambda r: r["value"])
    assert summary["best_trial"] == best["number"] and summary["val_accuracy"] == best["value"]
    assert 0 <= summary["test_accuracy"] <= 1
    assert json.loads((folder / "search.json").read_text())["best_trial"] == best["number"]
    scored = sorted(p.parent.name for p in (folder / "trials").glob("*/evaluations"))
    assert scored == [f"trial-{best['number']:03d}"]
    assert "graft train --config best.yaml" in (folder / "best.yaml").read_text()


def test_best_yaml_reproduces_the_best_trial(image_folder, tmp_path, capsys):
    folder = tmp_path / "s"
    summary = search.run_search(base(image_folder, tmp_path), SPACE, folder, trials=2)
    capsys.readouterr()
    assert main(["train", "--config", str(folder / "best.yaml"), "--out", str(tmp_path / "again")]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    history = read_history(run)
    assert history[-1]["val_acc"] == pytest.approx(summary["val_accuracy"], abs=1e-6)


def test_resume_adds_trials_until_the_total(image_folder, tmp_path):
    folder = tmp_path / "s"
    search.run_search(base(image_folder, tmp_path), SPACE, folder, trials=3)
    assert main(["search", "--resume", str(folder), "--trials", "5"]) == 0
    numbers = [r["number"] for r in json.loads((folder / "trials.json").read_text())]
    assert sorted(numbers) == [0, 1, 2, 3, 4]
    summary = json.loads((folder / "search.json").read_text())
    assert summary["trials_done"] == 5 and summary["test_accuracy"] is not None


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"type": "float", "low": 1e-3, "high": 1e-2}}, "did you mean train.lr"),
    ({"train.lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "must be below high"),
    ({"train.optimizer": {"type": "categorical", "choices": []}}, "empty choices"),
    ({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "when": {"head.nope": 1}}}, "head.nope"),
    ({}, "empty"),
    ({"train.lr": {"type": "float", "low": "tiny", "high": 1e-2}}, "low 'tiny' is not a number"),
    ({"train.epochs": {"type": "int", "low": 2.5, "high": 5}}, "not a whole number"),
])
def test_bad_space_is_one_line_and_creates_nothing(image_folder, tmp_path, capsys, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    code = main(["search", "--data", str(image_folder), "--backbone", "test_efficientnet",
                 "--space", str(path), "--out", str(tmp_path / "runs"), "--name", "s"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError):
        search.check_space(space)


def test_resume_of_a_non_search_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["search", "--resume", str(tmp_path / "run")]) == 2
    assert "not a search folder" in capsys.readouterr().err
    assert main(["search", "--resume", str(tmp_path / "run"), "--lr", "0.1"]) == 2
    assert "saved base.yaml" in capsys.readouterr().err


def test_exponents_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-4 as a string: the space takes it as the number a user meant."""
    space = search.check_space(yaml.safe_load("train.lr: {type: float, low: 1e-4, high: 3e-3, log: true}"))
    assert space["train.lr"]["low"] == 1e-4 and space["train.lr"]["high"] == 3e-3


def test_timeout_parsing():
    assert search.parse_timeout("90s") == 90 and search.parse_timeout("30m") == 1800
    assert search.parse_timeout("2h") == 7200 and search.parse_timeout("45") == 45
    with pytest.raises(ConfigError, match="--timeout"):
        search.parse_timeout("soon")


def test_a_diverging_trial_is_recorded_as_failed_and_the_search_goes_on(image_folder, tmp_path):
    space = {"train.lr": {"type": "categorical", "choices": [1e-3, 1e30]}}  # 1e30: the loss turns NaN
    summary = search.run_search(base(image_folder, tmp_path), space, tmp_path / "s", trials=4)
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert len(rows) == 4
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert failed and all(r["params"]["train.lr"] == 1e30 and "nan" in r["error"] for r in failed)
    assert any(r["state"] == "COMPLETE" for r in rows)
    assert summary["params"] == {"train.lr": 1e-3}


def test_conditional_entries_and_layer_widths(image_folder, tmp_path):
    from optuna.trial import FixedTrial
    space = {"backbone.features": {"type": "categorical", "choices": ["last", "multi"]},
             "train.flip_views": {"type": "bool", "when": {"backbone.features": "multi"}},
             "head.hidden": {"type": "layers", "low": 0, "high": 2, "choices": [16, 32]},
             "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True, "zero": True},
             "head.dropout": {"type": "float", "low": 0.0, "high": 0.5, "when": {"head.activation": "gelu"}}}
    cfg = base(image_folder, tmp_path)  # head.activation relu: dropout is never sampled
    trial = FixedTrial({"backbone.features": "last", "head.hidden.layers": 2, "head.hidden.0": 16,
                        "head.hidden.1": 32, "train.weight_decay.zero": True})
    assert search.sample(trial, space, cfg) == {"backbone.features": "last", "head.hidden": [16, 32],
                                                "train.weight_decay": 0.0}
    trial = FixedTrial({"backbone.features": "multi", "train.flip_views": True, "head.hidden.layers": 0,
                        "train.weight_decay.zero": False, "train.weight_decay": 1e-4})
    assert search.sample(trial, space, cfg) == {"backbone.features": "multi", "train.flip_views": True,
                                                "head.hidden": [], "train.weight_decay": 1e-4}


def test_latency_objective_and_int8_step_measure_the_shipped_model(image_folder, tmp_path):
    """With latency as an objective every trial's ONNX model is timed; a trial whose export.int8 is
    on ships the int8 model, so its validation accuracy is the int8 model's, measured on validation."""
    space = {"export.int8": {"type": "bool"}, "head.hidden": {"type": "layers", "low": 0, "high": 1, "choices": [16]}}
    settings = search.SearchSettings(objectives=["val_acc", "latency_ms", "size_mb"], seed=0)
    summary = search.run_search(base(image_folder, tmp_path), space, tmp_path / "s", trials=4, settings=settings)
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    done = [r for r in rows if r["state"] == "COMPLETE"]
    assert {r["params"]["export.int8"] for r in done} == {False, True}
    for r in done:
        assert r["latency_ms"] > 0 and r["size_mb"] > 0
        run = Path(r["run"])
        assert (run / "export" / ("model.int8.onnx" if r["int8"] else "model.onnx")).is_file()
        assert not (run / "evaluations").exists() or summary["pareto"]  # test scored for chosen ones only
        if r["int8"]:  # int8 is judged by its own accuracy, the fp32 one is kept beside it
            assert r["val_acc"] == r["value"] and "val_acc_fp32" in r
    assert summary["pareto"] and all(p["test_accuracy"] is not None for p in summary["pareto"])
    for p in summary["pareto"]:  # an int8 member is scored as shipped: its int8 model, not the PyTorch one
        row = next(r for r in done if r["number"] == p["number"])
        shipped = Path(row["run"], "export", "model.int8.test.json")
        assert shipped.is_file() == bool(row["int8"])
        if row["int8"]:
            assert json.loads(shipped.read_text())["accuracy"] == p["test_accuracy"]


def test_steps_and_the_base_config_in_the_space(image_folder, tmp_path):
    cfg = base(image_folder, tmp_path)   # head.hidden [16]? see tiny_overrides; lr 3e-3
    space = {"export.int8": {"type": "bool"}, "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
             "head.hidden": {"type": "layers", "low": 0, "high": 2, "choices": list({16, 32, *cfg.head.hidden})},
             "train.optimizer": {"type": "categorical", "choices": ["sgd"]}}   # the base's adam is not in it
    assert search.base_params(space, cfg) is None   # the base's optimizer lies outside the space
    del space["train.optimizer"]
    params = search.base_params(space, cfg)
    assert params["export.int8"] is False and params["train.lr"] == cfg.train.lr
    assert params["head.hidden.layers"] == len(cfg.head.hidden)
    summary = search.run_search(cfg, space, tmp_path / "s", trials=2)
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert rows[0]["label"] == "base config" and rows[0]["params"] == params
    assert Path(rows[0]["run"], "config.yaml").read_text().count(f"lr: {cfg.train.lr}") == 1
    assert summary["trials_done"] == 2
    with pytest.raises(ConfigError, match="export.int8: needs type: bool"):
        search.check_space({"export.int8": {"type": "float", "low": 0, "high": 1}})
    with pytest.raises(ConfigError, match="did you mean export.int8"):
        search.check_space({"export.int9": {"type": "bool"}})


def test_prune_step_prunes_the_trial_run_on_validation_only(image_folder, tmp_path):
    """A trial with prune.amount > 0 is channel-pruned as `graft prune` does: the pruned run (fewer
    parameters) is the trial's, its value is the pruned model's validation accuracy, and no test
    split is scored until the search chooses; best.yaml says how to redo the pruning."""
    space = {"prune.amount": {"type": "categorical", "choices": [0.0, 0.5]},
             "prune.finetune_epochs": {"type": "categorical", "choices": [0]}}
    cfg = base(image_folder, tmp_path)
    assert search.base_params(space, cfg) is None   # the base recovers 1 epoch: outside the space
    space["prune.finetune_epochs"]["choices"] = [0, 1]
    assert search.base_params(space, cfg) == {"prune.amount": 0.0, "prune.finetune_epochs": 1}
    summary = search.run_search(cfg, space, tmp_path / "s", trials=3)
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    pruned = [r for r in rows if r["state"] == "COMPLETE" and r["params"]["prune.amount"] > 0]
    plain = [r for r in rows if r["state"] == "COMPLETE" and r["params"]["prune.amount"] == 0]
    assert pruned and plain
    for r in pruned:
        run = Path(r["run"])
        assert run.name.endswith("-pruned") and (run / "model.safetensors").is_file()
        record = json.loads((run / "prune.json").read_text())
        assert "test_acc" not in record["before"] and "test_acc" not in record["after"]
        assert r["weights_unpruned"] > r["weights"] == record["after"]["params"]
        assert r["value"] == r["val_acc"] == record["after"]["val_acc"] and "val_acc_unpruned" in r
    for r in rows:   # only the chosen trial's run was scored on the test split
        chosen = r["number"] == summary["best_trial"]
        assert (Path(r["run"]) / "evaluations").is_dir() == chosen
        assert not (Path(r["run"]) / "test_metrics.json").exists()
    best = next(r for r in rows if r["number"] == summary["best_trial"])
    note = (tmp_path / "s" / "best.yaml").read_text()
    assert ("graft prune RUN --amount 0.5" in note) == (best["params"]["prune.amount"] > 0)
    with pytest.raises(ConfigError, match="prune.amount: fractions"):
        search.check_space({"prune.amount": {"type": "float", "low": 0.2, "high": 1.5}})


def test_grid_sampler_runs_each_combination_once(image_folder, tmp_path, capsys):
    """A small categorical space under random sampling repeats combinations; --sampler grid runs
    each once, asks no more trials than the grid holds, and refuses a space without a finite grid."""
    space = {"train.epochs": {"type": "categorical", "choices": [2, 3]},
             "head.dropout": {"type": "categorical", "choices": [0.0, 0.25, 0.5]}}
    settings = search.SearchSettings(sampler="grid", seed=0)
    cfg = base(image_folder, tmp_path, **{"train.epochs": 4})   # the base config is outside the grid
    summary = search.run_search(cfg, space, tmp_path / "s", trials=10, settings=settings)
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    combos = [(r["params"]["train.epochs"], r["params"]["head.dropout"]) for r in rows]
    assert sorted(combos) == sorted((e, d) for e in (2, 3) for d in (0.0, 0.25, 0.5))
    assert summary["trials_done"] == 6 and "the grid has 6 trial(s); 10 asked" in capsys.readouterr().err
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}))
    code = main(["search", "--data", str(image_folder), "--backbone", "test_efficientnet", "--sampler", "grid",
                 "--space", str(path), "--out", str(tmp_path / "runs"), "--name", "g"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--sampler grid needs categorical or bool" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_trials_that_must_end_by_the_deadline_keep_the_median_trial_in_hand():
    import optuna
    from graftnet.search.runner import _typical_s
    study = optuna.create_study()
    assert _typical_s(study, search.SearchSettings(end_by_deadline=True)) == 0.0   # nothing to judge by yet
    for seconds in (200.0, 10.0, 14.0, 30.0):   # the first trial fills the feature cache: the median ignores it
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"seconds": seconds}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"seconds": 1.0}))
    assert _typical_s(study, search.SearchSettings(end_by_deadline=True)) == 14.0
    assert _typical_s(study, search.SearchSettings()) == 0.0   # `graft search --timeout`: no trial starts after it
