"""What a finished search leaves beyond the trials: the Pareto front and its single test scoring,
the latency constraint, plots and report.html. Studies are built by hand (no training) except one."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from graftnet import config, search
from graftnet.search.results import SELECTION, finish
from graftnet.search.settings import SearchSettings

from .conftest import tiny_overrides

DISTS = {"train.lr": FloatDistribution(1e-4, 1e-2, log=True),
         "train.optimizer": CategoricalDistribution(["adam", "adamw"])}


class FakeEvaluate:
    """Records each run it scores and leaves the evaluation behind, as evaluate_run does."""

    def __init__(self):
        self.calls = []

    def __call__(self, run):
        self.calls.append(Path(run).name)
        acc = 0.5 + int(Path(run).name[-3:]) / 100
        out = Path(run) / "evaluations" / "data"
        out.mkdir(parents=True)
        (out / "test_metrics.json").write_text(json.dumps({"accuracy": acc}))
        return {"accuracy": acc}


def make_study(tmp_path, image_folder, directions, trials):
    """trials: (values or None, state, attrs), each trained nowhere: a run folder with a config.yaml
    (enough for best.yaml) under tmp_path/s/trials/trial-NNN."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path))
    study = optuna.create_study(directions=directions)
    for values, state, attrs in trials:
        add_trial(study, cfg, tmp_path, values, state, attrs)
    return study, cfg


def add_trial(study, cfg, tmp_path, values, state, attrs):
    i = len(study.trials)
    run = tmp_path / "s" / "trials" / f"trial-{i:03d}"
    run.mkdir(parents=True)
    config.save_yaml(cfg, run / "config.yaml", "a trial")
    study.add_trial(create_trial(params={"train.lr": 1e-3 * (i + 1), "train.optimizer": ["adam", "adamw"][i % 2]},
                                 distributions=DISTS, values=values, state=state,
                                 user_attrs={"run": str(run), "seconds": 1.5, **attrs}))


def run_finish(study, cfg, tmp_path, settings):
    evaluate = FakeEvaluate()
    summary = finish(study, tmp_path / "s", {"train.lr": {"type": "float"}}, cfg, "graft search --x", evaluate,
                     settings)
    return summary, evaluate


C = TrialState.COMPLETE


def test_front_members_are_scored_once_and_the_rest_never(image_folder, tmp_path):
    # (val_acc, latency): 0, 2 and 4 form the front; 1 and 3 are beaten by 2; 5 failed
    points = [(0.60, 1.0), (0.62, 5.0), (0.70, 3.0), (0.65, 4.0), (0.80, 9.0)]
    trials = [([a, ms], C, {"latency_ms": ms, "size_mb": 1.0, "latency_ms_b64": ms * 9}) for a, ms in points]
    trials[0][2]["label"] = "base config"
    trials.append((None, TrialState.FAIL, {"error": "loss is nan"}))
    study, cfg = make_study(tmp_path, image_folder, ["maximize", "minimize"], trials)
    settings = SearchSettings(objectives=["val_acc", "latency_ms"])
    summary, evaluate = run_finish(study, cfg, tmp_path, settings)

    front = [p["number"] for p in summary["pareto"]]
    assert front == [4, 2, 0]  # most accurate first
    assert set(front) == {t.number for t in study.best_trials}
    assert sorted(evaluate.calls) == ["trial-000", "trial-002", "trial-004"]  # the best (4) too, once
    assert [p["test_accuracy"] for p in summary["pareto"]] == pytest.approx([0.54, 0.52, 0.50])
    assert summary["best_trial"] == 4 and summary["test_accuracy"] == pytest.approx(0.54)
    assert summary["pareto"][2]["latency_ms"] == 1.0 and summary["pareto"][2]["label"] == "base config"
    saved = json.loads((tmp_path / "s" / "search.json").read_text())
    assert saved["selection"] == SELECTION and [p["number"] for p in saved["pareto"]] == front

    rows = list(csv.DictReader((tmp_path / "s" / "trials.csv").open()))
    assert {"val_acc", "latency_ms", "latency_ms_b64", "size_mb", "label", "pareto"} <= set(rows[0])
    assert [r["pareto"] for r in rows] == ["True", "False", "True", "False", "True", "False"]
    assert rows[3]["latency_ms_b64"] == "36.0" and rows[5]["error"] == "loss is nan"

    for name in ("history.png", "importance.png", "pareto.png"):
        with Image.open(tmp_path / "s" / name) as im:
            assert im.width > 500 and im.height > 200, name
    html = (tmp_path / "s" / "report.html").read_text()
    assert "<h2>Pareto front</h2>" in html and SELECTION in html
    assert html.count("data:image/png;base64,") == 3 and 'src="history.png"' not in html
    front_table = html.split("<h2>Pareto front</h2>")[1].split("<h2>")[0]
    assert front_table.count("<tr>") == 1 + 3 and "base config" in front_table

    # a resumed search finishes again: the chosen runs were scored, nothing is scored twice
    again, evaluate = run_finish(study, cfg, tmp_path, settings)
    assert evaluate.calls == [] and again["pareto"] == summary["pareto"]


def test_latency_limit_gives_the_front_of_feasible_trials(image_folder, tmp_path):
    # objectives accuracy and size, latency only a constraint (max 5 ms). Trial 0 is the most
    # accurate but too slow and beats 1 on both objectives: 1 still belongs to the feasible front.
    # Trial 3 has no latency: not known to meet the limit.
    trials = [([0.90, 1.0], C, {"latency_ms": 8.0}), ([0.80, 2.0], C, {"latency_ms": 4.0}),
              ([0.70, 0.5], C, {"latency_ms": 2.0}), ([0.95, 0.1], C, {}), ([0.60, 3.0], C, {"latency_ms": 1.0})]
    study, cfg = make_study(tmp_path, image_folder, ["maximize", "minimize"], trials)
    settings = SearchSettings(objectives=["val_acc", "size_mb"], max_latency_ms=5.0)
    summary, evaluate = run_finish(study, cfg, tmp_path, settings)
    assert [p["number"] for p in summary["pareto"]] == [1, 2]
    assert 1 not in {t.number for t in study.best_trials}  # why the front is not Optuna's, filtered
    assert sorted(evaluate.calls) == ["trial-001", "trial-002"]
    assert summary["best_trial"] == 1 and summary["feasible_trials"] == 3 and summary["no_feasible"] is None
    assert "best trial (1, validation accuracy 0.8000) of this search, the most accurate within 5 ms" in (tmp_path / "s" / "best.yaml").read_text()
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert [r["feasible"] for r in rows] == [False, True, True, False, True]
    assert (tmp_path / "s" / "pareto.png").is_file()  # latency measured: plotted against size, the x objective


def test_single_objective_with_a_limit_and_no_feasible_trial(image_folder, tmp_path):
    trials = [([0.9], C, {"latency_ms": 12.0}), ([0.7], C, {"latency_ms": 30.0}),
              (None, TrialState.PRUNED, {"latency_ms": 2.0, "val_acc": 0.4})]
    study, cfg = make_study(tmp_path, image_folder, ["maximize"], trials)
    summary, evaluate = run_finish(study, cfg, tmp_path, SearchSettings(max_latency_ms=10.0))
    assert evaluate.calls == [] and summary["best_trial"] is None and summary["pareto"] is None
    assert "max_latency_ms 10" in summary["no_feasible"] and "12 ms" in summary["no_feasible"]
    assert not (tmp_path / "s" / "best.yaml").exists()
    assert json.loads((tmp_path / "s" / "search.json").read_text())["no_feasible"] == summary["no_feasible"]
    html = (tmp_path / "s" / "report.html").read_text()
    assert 'class="warn"' in html and "No complete trial meets max_latency_ms 10" in html
    assert "<h2>Pareto front</h2>" not in html and (tmp_path / "s" / "pareto.png").is_file()

    # one trial within the limit: it is the best even though trial 0 is more accurate
    add_trial(study, cfg, tmp_path, [0.5], C, {"latency_ms": 9.0})
    summary, evaluate = run_finish(study, cfg, tmp_path, SearchSettings(max_latency_ms=10.0))
    assert summary["best_trial"] == 3 and summary["no_feasible"] is None and evaluate.calls == ["trial-003"]


def test_importance_needs_two_complete_trials_that_differ(image_folder, tmp_path):
    trials = [([0.8], C, {}), (None, TrialState.FAIL, {"error": "bad"})]
    study, cfg = make_study(tmp_path, image_folder, ["maximize"], trials)
    study.enqueue_trial({"train.lr": 1e-3}, user_attrs={"label": "base config"})  # queued: not done
    summary, _ = run_finish(study, cfg, tmp_path, SearchSettings())
    assert summary["trials_done"] == 2 and summary["best_trial"] == 0
    html = (tmp_path / "s" / "report.html").read_text()
    assert not (tmp_path / "s" / "importance.png").exists() and "No parameter importance" in html
    assert not (tmp_path / "s" / "pareto.png").exists()  # no latency anywhere: nothing to plot it against
    assert (tmp_path / "s" / "history.png").is_file() and summary["states"] == {"COMPLETE": 1, "FAIL": 1, "WAITING": 1}


def test_a_real_search_writes_its_report(image_folder, tmp_path):
    space = {"train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path, **{"train.epochs": 2}))
    summary = search.run_search(cfg, space, tmp_path / "real", trials=3, command="graft search --trials 3")
    html = (tmp_path / "real" / "report.html").read_text()
    assert html.count("<tr>") >= 1 + 3 and "graft search --trials 3" in html
    assert "Best config (best.yaml)" in html and "graft train --config best.yaml" in html
    assert summary["trial_seconds"] > 0 and summary["span_seconds"] >= 0 and summary["selection"] == SELECTION


def test_a_best_trial_run_on_another_machine_is_named_not_read(tmp_path):
    """A shared study's best trial ran elsewhere: its folder is not here, so no best.yaml and no
    test score from this machine, and a line that says where it is."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial
    from graftnet.search import SearchSettings
    from graftnet.search.results import finish
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(params={"train.lr": 1e-3}, distributions={"train.lr": FloatDistribution(1e-4, 1e-2)},
                                 values=[0.9], state=TrialState.COMPLETE,
                                 user_attrs={"run": str(tmp_path / "elsewhere" / "trial-000"),
                                             "worker": {"host": "gpu-box", "pid": 1}}))
    calls = []
    summary = finish(study, tmp_path, {}, None, None, lambda run: calls.append(run) or {}, SearchSettings())
    assert summary["best_trial"] == 0 and summary["test_accuracy"] is None and not calls
    assert not (tmp_path / "best.yaml").exists() and (tmp_path / "search.json").is_file()


def _matmul_chain(path: Path, width: int, layers: int) -> Path:
    """An ONNX model of `layers` width x width MatMuls on a [batch, width] input: its cost is chosen."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / width ** 0.5, f"w{i}")
             for i in range(layers)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}" if i < layers - 1 else "y"])
             for i in range(layers)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_front_is_chosen_on_latencies_timed_again_in_turns(image_folder, tmp_path):
    # each trial's own timing is one moment of the machine: here trial 0's heavy model was timed at
    # 1 ms, so it looked as fast as it was accurate and trial 1's light model (timed at 5 ms) seemed
    # dominated. Timed again, in turns, the heavy model is the slow one and both are on the front.
    heavy = _matmul_chain(tmp_path / "heavy.onnx", 1024, 24)
    light = _matmul_chain(tmp_path / "light.onnx", 8, 1)
    trials = [([0.80, 1.0], C, {"latency_ms": 1.0, "model": str(heavy)}),
              ([0.70, 5.0], C, {"latency_ms": 5.0, "model": str(light)})]
    study, cfg = make_study(tmp_path, image_folder, ["maximize", "minimize"], trials)
    summary, _ = run_finish(study, cfg, tmp_path, SearchSettings(objectives=["val_acc", "latency_ms"]))
    assert summary["latency_retimed"] is True
    assert [p["number"] for p in summary["pareto"]] == [0, 1]
    fast, slow = summary["pareto"][1], summary["pareto"][0]
    assert fast["latency_ms"] < slow["latency_ms"] and slow["latency_ms_trial"] == 1.0
    rows = json.loads((tmp_path / "s" / "trials.json").read_text())
    assert [r["latency_ms_trial"] for r in rows] == [1.0, 5.0] and rows[0]["latency_ms"] > rows[1]["latency_ms"]
    # with a model not on this machine (a shared study's other worker) the trials' own timings stand
    heavy.unlink()
    again, _ = run_finish(study, cfg, tmp_path, SearchSettings(objectives=["val_acc", "latency_ms"]))
    assert again["latency_retimed"] is False and [p["number"] for p in again["pareto"]] == [0]
