"""`graft continual` and `graft extend`: methods on the one loop, resume by task, the run folders they
leave, and one clear line for each bad input.

Learner tests use a synthetic task table (Gaussian class clusters as "features"), so they need no
backbone; command tests use generated images on the tiny random-weight backbone."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from graftnet.cli import main
from graftnet.config import resolve
from graftnet.continual.data import TaskTable
from graftnet.continual.extend import _keeper, _old_accuracy
from graftnet.continual.learner import Learner, prototype_head, score
from graftnet.continual.methods import EWC, diagonal_fisher
from graftnet.continual.metrics import summarize
from graftnet.continual.tasks import ContinualSettings, Task, TaskSequence, check_tasks, split_tasks
from graftnet.errors import ConfigError
from graftnet.evaluation import predict
from graftnet.heads import make_mlp
from graftnet.model import load_model
from graftnet.serve import create_app

from .conftest import TINY, make_folder


def synthetic_table(n_tasks: int = 3, per_task: int = 2, dim: int = 16, rows: int = 40, seed: int = 0,
                    spread: float = 3.0) -> TaskTable:
    """Classes as Gaussian clusters around random centres (`spread` apart): separable, so a head learns
    each task; closer clusters leave the head unsure, so its Fisher is far from zero."""
    g = torch.Generator().manual_seed(seed)
    k = n_tasks * per_task
    centres = spread * torch.randn(k, dim, generator=g)
    x, y, task = {}, {}, {}
    for split, n in (("train", rows), ("val", rows // 4), ("test", rows // 2)):
        labels = torch.arange(k).repeat_interleave(n)
        x[split] = centres[labels] + torch.randn(len(labels), dim, generator=g)
        y[split], task[split] = labels, labels // per_task
    return TaskTable(x, y, task, [f"c{i}" for i in range(k)], [f"t{i}" for i in range(n_tasks)],
                     [torch.arange(i * per_task, (i + 1) * per_task) for i in range(n_tasks)])


def cfg(**extra):
    return resolve(None, {"head.hidden": [32], "head.dropout": 0.0, "train.epochs": 3, "train.batch_size": 16,
                          "train.lr": 0.01, **extra})


def learn(tmp_path, method: str, scenario: str = "class", table=None, name=None, **settings):
    s = ContinualSettings(scenario=scenario, methods=[method], **settings)
    learner = Learner(table or synthetic_table(), method, 0, s, cfg(), tmp_path / (name or method))
    return learner, learner.run()


def test_naive_forgets_in_class_incremental_and_replay_and_ridge_do_not(tmp_path):
    _, naive = learn(tmp_path, "naive")
    _, replay = learn(tmp_path, "replay", replay=60)
    _, ridge = learn(tmp_path, "ridge", projection=64)
    # the classic failure: trained only on the newest task's classes, the head predicts only them
    assert naive["matrix"][-1][0] < 0.1 and naive["matrix"][-1][-1] > 0.9
    assert replay["matrix"][-1][0] > 0.8
    assert all(a > 0.95 for a in ridge["matrix"][-1])
    # a class-incremental head cannot predict a class it has not met: future tasks score 0
    assert naive["matrix"][0][1] == 0 and naive["initial"] == [0.0, 0.0, 0.0]


def test_task_incremental_scores_each_task_among_its_own_outputs(tmp_path):
    _, naive = learn(tmp_path, "naive", scenario="task")
    # with the task known, the newest task's training cannot make old rows pick new outputs
    assert naive["matrix"][-1][0] > 0.8
    # its matrix is within-task already: no second one
    assert "within_matrix" not in naive


def overlapping_table(seed: int = 0) -> TaskTable:
    """Two tasks whose classes lie pairwise close: class 2 beside class 0, class 3 beside class 1,
    the pairs far apart. Within a task the classes are easy; among all four, the new ones compete."""
    g = torch.Generator().manual_seed(seed)
    e = torch.eye(8)
    centres = torch.stack([4 * e[0], -4 * e[0], 4 * e[0] + 0.5 * e[1], -4 * e[0] + 0.5 * e[1]])
    x, y, task = {}, {}, {}
    for split, n in (("train", 60), ("val", 20), ("test", 40)):
        labels = torch.arange(4).repeat_interleave(n)
        x[split] = centres[labels] + 0.7 * torch.randn(len(labels), 8, generator=g)
        y[split], task[split] = labels, labels // 2
    return TaskTable(x, y, task, [f"c{i}" for i in range(4)], ["t0", "t1"], [torch.arange(0, 2), torch.arange(2, 4)])


@pytest.mark.parametrize("method", ["ridge", "ncm", "naive"])
def test_within_task_matrix_separates_competing_classes_from_forgetting(tmp_path, method):
    _, out = learn(tmp_path, method, table=overlapping_table(), projection=64)
    within, matrix = out["within_matrix"], out["matrix"]
    assert len(within) == len(matrix) == 2 and all(len(r) == 2 for r in within)
    # after the first task only its classes are visible: the same number either way
    assert within[0][0] == matrix[0][0]
    plain, inside = summarize(matrix), summarize(within)
    # the new classes take the old task's rows among all four (ridge, NCM: a third of them; naive
    # training on the new task alone: all), not among its own two
    assert plain["forgetting"] > 0.3 and inside["forgetting"] <= 0.02
    assert inside["forgetting"] <= plain["forgetting"]
    assert inside["forgetting_max"] >= inside["forgetting"] and inside["bwt"] == -inside["forgetting"]


def test_ewc_keeps_weights_near_the_old_task_and_its_penalty_is_zero_at_the_anchor(tmp_path):
    table = synthetic_table(n_tasks=2, spread=0.4)
    strong, _ = learn(tmp_path, "ewc", "task", table, "strong", ewc_lambda=1e3)
    weak, _ = learn(tmp_path, "naive", "task", table, "weak")
    fisher, anchor = strong.callbacks[0].terms[0]
    drift = {n: sum(((dict(h.named_parameters())[k] - anchor[k]) ** 2 * fisher[k]).sum().item() for k in fisher)
             for n, h in (("strong", strong.head), ("weak", weak.head))}
    assert drift["strong"] < 0.2 * drift["weak"]
    cb = EWC(strong.head, 5.0, None, 100)
    cb.terms = [(fisher, {k: v.detach().clone() for k, v in strong.head.named_parameters()})]
    loss = torch.tensor(1.0)
    assert cb.after_loss(None, loss).item() == pytest.approx(1.0)   # no penalty at the anchor


def test_fisher_from_zero_samples_is_a_clear_error():
    with pytest.raises(ConfigError, match="zero samples"):
        diagonal_fisher(torch.nn.Linear(4, 2), torch.empty(0, 4), torch.empty(0, dtype=torch.long))


def test_fisher_is_the_mean_squared_per_row_gradient():
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    got = diagonal_fisher(model, x, y)
    want = torch.zeros_like(model.weight)
    for xi, yi in zip(x, y):
        model.zero_grad()
        torch.log_softmax(model(xi[None]), 1)[0, yi].backward()
        want += model.weight.grad ** 2
    assert torch.allclose(got["weight"], want / 5, atol=1e-6)


@pytest.mark.parametrize("method", ["ewc+replay", "lwf", "online_ewc", "ridge"])
def test_a_run_resumed_after_a_task_equals_one_never_stopped(tmp_path, method):
    table = synthetic_table()
    s = ContinualSettings(methods=[method], replay=30, projection=32)
    whole = Learner(table, method, 0, s, cfg(), tmp_path / "whole")
    whole.run()
    part = Learner(table, method, 0, s, cfg(), tmp_path / "part")
    part.initial = part.evaluate(-1)
    part.learn_task(0)   # "killed" after its first task was saved
    part.matrix.append(part.evaluate(0, within=part.within_matrix))
    part.val_matrix.append(part.evaluate(0, "val"))
    part.seconds.append(0.0)
    part._save()
    again = Learner(table, method, 0, s, cfg(), tmp_path / "part")
    out = again.run()
    assert out["matrix"] == whole.matrix and out["val_matrix"] == whole.val_matrix
    assert out["within_matrix"] == whole.within_matrix and len(whole.within_matrix) == 3
    a, b = load_file(str(tmp_path / "whole" / "continual_state.safetensors")), \
        load_file(str(tmp_path / "part" / "continual_state.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prototype_heads_are_ordinary_mlps_with_the_same_predictions(tmp_path):
    table = synthetic_table()
    for method in ("ncm", "ridge"):
        learner, _ = learn(tmp_path, method, projection=32)
        head, head_cfg = prototype_head(learner.proto, table.dim, len(table.classes), "avg")
        x = table.x["test"]
        assert torch.equal(head(x).argmax(1), learner.proto.logits(x).argmax(1))
        assert head_cfg["hidden"] == ([32] if method == "ridge" else [])


def _gated(tmp_path, table, before=None):
    """A trained MLP over the table's first 3 classes, then a ridge over all 6 merged with it;
    `before` stands in for the run's old-task accuracy per split (default: the MLP's own)."""
    torch.manual_seed(0)
    old = make_mlp(table.dim, 3, cfg().head)
    optimizer, rows = torch.optim.Adam(old.parameters(), 0.01), table.y["train"] < 3
    for _ in range(100):
        optimizer.zero_grad()
        F.cross_entropy(old(table.x["train"][rows]), table.y["train"][rows]).backward()
        optimizer.step()
    learner, out = learn(tmp_path, "ridge", table=table, projection=32)
    proto, proto_cfg = learner.final_head()
    kept, before = {}, before or {split: _old_accuracy(old, table, split) for split in ("test", "val")}
    gated, head_cfg, changes = _keeper(table, old.eval(), 3, {"hidden": [32]}, kept, before)(proto, proto_cfg, out)
    return old, proto, gated, changes, out, kept


def test_kept_head_ranks_the_old_classes_as_the_run_and_learns_the_new_ones(tmp_path):
    table = synthetic_table(n_tasks=2, per_task=3, spread=1.5)
    # on these clusters the run and the prototype head both score 1.0 on the old task, so the run's
    # scores are stood in for by values neither head gives
    old, proto, gated, changes, out, kept = _gated(tmp_path, table, before={"test": 0.25, "val": 0.5})
    assert changes == {"gate": {"old_classes": 3, "hidden": [32]}}
    x, y = table.x["test"], table.y["test"]
    with torch.no_grad():
        logits = gated(x)
        # every row, old class or new: among the old outputs the run's MLP decides, unchanged
        assert torch.equal(logits[:, :3].argmax(1), old(x).argmax(1))
        assert torch.allclose(logits.logsumexp(1), torch.zeros(len(x)), atol=1e-5)
        acc = (logits.argmax(1) == y).float().mean()
        assert acc > 0.7 and acc >= (proto(x).argmax(1) == y).float().mean() - 0.05
    # the first step is the run itself: its old-task cells are the run's scores, per split
    assert (out["matrix"][0][0], out["val_matrix"][0][0]) == (0.25, 0.5)
    # the record's last row scores the saved (gated) head; the prototype head's own row is kept apart
    assert out["matrix"][-1] == score(table, logits, y, table.task["test"], "class", torch.ones(6, dtype=torch.bool))
    assert out["prototype_last"] == kept["proto_after"] == \
        score(table, proto(x), y, table.task["test"], "class", torch.ones(6, dtype=torch.bool))


def test_kept_head_calibrates_its_gate_on_validation_rows_only(tmp_path):
    table = synthetic_table(n_tasks=2, per_task=3, spread=1.5)
    scales = _gated(tmp_path / "a", table)[2].scales
    assert (scales > 0).all() and not torch.equal(scales, torch.ones(2))
    g = torch.Generator().manual_seed(1)
    noisy = dataclasses.replace(table, x={**table.x, "test": 100 * torch.randn(table.x["test"].shape, generator=g)})
    assert torch.equal(_gated(tmp_path / "b", noisy)[2].scales, scales)   # test rows changed: same gate
    moved = table.x["val"] + torch.randn(table.x["val"].shape, generator=g)
    other = dataclasses.replace(table, x={**table.x, "val": moved})
    assert not torch.equal(_gated(tmp_path / "c", other)[2].scales, scales)
    no_new = dataclasses.replace(table, y={**table.y, "val": table.y["val"].clamp(max=2)})
    with pytest.raises(ConfigError, match="validation images of the old and the new classes"):
        _gated(tmp_path / "d", no_new)


def test_split_and_task_checks_give_one_line():
    tasks = split_tasks(list("abcdef"), 3, seed=1)
    assert sorted(c for t in tasks for c in t.classes) == list("abcdef") and all(len(t.classes) == 2 for t in tasks)
    assert split_tasks(list("abcdef"), 3, 1) == tasks and split_tasks(list("abcdef"), 3, 2) != tasks
    with pytest.raises(ConfigError, match="do not divide"):
        split_tasks(list("abcde"), 2)
    seq = TaskSequence("d", [Task("one", ["a", "b"]), Task("two", ["b", "c"])])
    with pytest.raises(ConfigError, match="task two repeats class 'b' of task one"):
        check_tasks(seq, "class", {"d": list("abc")})
    check_tasks(seq, "task", {"d": list("abc")})   # a head per task: tasks may share classes
    with pytest.raises(ConfigError, match="class\\(es\\) zebra are not in d"):
        check_tasks(TaskSequence("d", [Task("one", ["a", "zebra"])]), "class", {"d": list("abc")})


def tiny_flags(tmp_path: Path) -> list[str]:
    return ["--backbone", TINY, "--no-pretrained", "--image-size", "32", "--features", "multi", "--hidden", "32",
            "--dropout", "0", "--epochs", "3", "--batch-size", "8", "--lr", "3e-3",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs")]


def test_graft_continual_writes_runs_a_summary_and_a_report(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c", "d"), splits={"train": 16, "test": 6})
    assert main(["continual", "--data", str(data), "--split", "2", "--methods", "naive,ridge,lwf+replay",
                 "--projection", "64", "--seeds", "0,1", "--name", "c", *tiny_flags(tmp_path)]) == 0
    folder = tmp_path / "runs" / "c"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["methods"]) == {"naive", "ridge", "lwf+replay"}
    assert summary["methods"]["naive"]["runs"] == 2 and summary["methods"]["naive"]["metrics"]["forgetting"]["n"] == 2
    assert (folder / "report.html").stat().st_size > 10_000 and (folder / "steps.png").is_file()
    run = folder / "runs" / "ridge-s1"
    record = json.loads((run / "continual.json").read_text())
    assert len(record["matrix"]) == 2 and record["seed"] == 1
    # class-incremental: the within-task matrix and its metrics beside the accuracy matrix's
    assert len(record["within_matrix"]) == 2 and record["within_matrix"][0][0] == record["matrix"][0][0]
    assert record["within_metrics"] == summarize(record["within_matrix"], None, [12, 12])
    within = summary["methods"]["ridge"]["within_metrics"]
    assert within["forgetting"]["n"] == 2 and set(within) >= {"forgetting", "bwt", "forgetting_max"}
    assert within["forgetting"]["mean"] == pytest.approx(
        sum(json.loads((folder / "runs" / f"ridge-s{s}" / "continual.json").read_text())["within_metrics"]
            ["forgetting"] for s in (0, 1)) / 2)
    page = (folder / "report.html").read_text()
    assert "forgetting within task" in page and "among its own classes only" in page
    assert "forgetting within task" in (run / "report.html").read_text()
    assert main(["predict", str(run), str(data / "test" / "a")]) == 0
    assert main(["evaluate", str(run)]) == 0   # the run folder is an ordinary run
    capsys.readouterr()
    # resuming a finished folder reads its runs back and rewrites the same summary
    assert main(["continual", "--resume", str(folder)]) == 0
    assert json.loads((folder / "summary.json").read_text())["methods"]["ridge"]["metrics"] == \
        summary["methods"]["ridge"]["metrics"]


@pytest.mark.parametrize("args, message", [
    (["--split", "3"], "do not divide into 3 tasks"),
    (["--split", "2", "--methods", "naive,ewcc"], "unknown ewcc"),
    (["--split", "2", "--methods", "ridge+ewc"], "only gradient methods combine"),
    ([], "--tasks tasks.yaml or --split N"),
    (["--split", "2", "--finetune-epochs", "2"], "finetune.epochs not used here"),
])
def test_bad_continual_input_is_one_line_and_makes_no_folder(tmp_path, capsys, args, message):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c", "d"), n=4)
    assert main(["continual", "--data", str(data), *args, "--name", "bad", *tiny_flags(tmp_path)]) == 2
    err = "".join(capsys.readouterr())
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "bad").exists()


def test_tasks_file_repeating_a_class_in_class_incremental_mode(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n=4)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"data: {data}\ntasks:\n  - {{name: first, classes: [a, b]}}\n  - {{name: second, classes: [b, c]}}\n")
    assert main(["continual", "--tasks", str(tasks), "--methods", "naive", "--name", "t", *tiny_flags(tmp_path)]) == 2
    assert "task second repeats class 'b' of task first" in "".join(capsys.readouterr())
    assert not (tmp_path / "runs" / "t").exists()   # nothing half-made is left
    assert main(["continual", "--resume", str(tmp_path)]) == 2
    assert "not a continual folder" in "".join(capsys.readouterr())


def test_extend_adds_classes_after_the_old_ones(tmp_path, capsys):
    """The old run knows b, c, d; the new data brings a and e (and b again): the extended run's
    outputs are b, c, d, a, e, and `graft evaluate` on data holding all five maps labels by name."""
    full = make_folder(tmp_path / "full", classes=("a", "b", "c", "d", "e"), splits={"train": 16, "test": 6})
    old, new = tmp_path / "old", tmp_path / "new"
    for split in ("train", "test"):
        for c, dest in (("b", old), ("c", old), ("d", old), ("a", new), ("e", new), ("b", new)):
            (dest / split).mkdir(parents=True, exist_ok=True)
            shutil.copytree(full / split / c, dest / split / c)
    flags = tiny_flags(tmp_path)
    assert main(["train", "--data", str(old), "--name", "old", *flags]) == 0
    run = tmp_path / "runs" / "old"
    assert main(["extend", str(run), "--data", str(new), "--name", "ext"]) == 0
    ext = tmp_path / "runs" / "ext"
    spec = json.loads((ext / "model.json").read_text())
    assert spec["classes"] == ["b", "c", "d", "a", "e"]   # old indices stay, new classes after them
    # ridge keeps the run's head by default: its MLP, then the prototype head of 3072 random features
    assert spec["gate"] == {"old_classes": 3, "hidden": [3072]} and spec["head"]["hidden"] == [32]
    out = json.loads((ext / "extend.json").read_text())
    assert out["new_classes"] == ["a", "e"] and out["new_acc_after"] > 0.5
    # fewer competing outputs can only keep or add correct answers
    assert out["old_acc_after_among_old"] >= out["old_acc_after"]
    # among the old classes the extended model answers as the run did, on any image
    assert out["keep_old_head"] and out["old_acc_after_among_old"] == out["old_acc_before"]
    assert set(out["prototype_alone"]) == {"old_acc_after", "new_acc_after", "old_acc_after_among_old", "acc_after"}
    # the matrix's first step is the run itself: its heatmap starts where the report's "before" does
    record = json.loads((ext / "continual.json").read_text())
    assert record["matrix"][0][0] == out["old_acc_before"] and record["matrix"][1][0] == out["old_acc_after"]
    (before, _), (after, _) = load_model(run), load_model(ext)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(after(x)[:, :3].argmax(1), before(x).argmax(1))
        assert torch.allclose(after(x).logsumexp(1), torch.zeros(16), atol=1e-5)   # log-probabilities
    assert (ext / "report.html").is_file()
    assert main(["predict", str(ext), str(full / "test" / "a")]) == 0
    # `graft serve` answers for the extended run as `predict` does, naming old and new classes alike
    image = next((full / "test" / "a").iterdir())
    expected = predict(ext, image, top=5)[0]
    with TestClient(create_app(ext)) as client:
        assert client.get("/info").json()["classes"] == ["b", "c", "d", "a", "e"]
        body = client.post("/predict?top=5", files={"file": (image.name, image.read_bytes(), "image/png")}).json()
    assert body["class"] == expected["class"] and body["probability"] == pytest.approx(expected["probability"], abs=1e-5)
    assert sorted(t["class"] for t in body["top"]) == ["a", "b", "c", "d", "e"]
    assert main(["export", str(ext)]) == 0   # the gated head exports and ONNX Runtime agrees with torch
    capsys.readouterr()
    assert main(["extend", str(ext), "--data", str(full), "--name", "ext3"]) == 2
    assert "is an extended run already" in "".join(capsys.readouterr())
    assert main(["extend", str(run), "--data", str(new), "--method", "replay", "--keep-old-head", "--name", "x"]) == 2
    assert "only with ridge or ncm" in "".join(capsys.readouterr()) and not (tmp_path / "runs" / "x").exists()
    assert main(["evaluate", str(ext), "--data", str(full)]) == 0
    scored = json.loads((ext / "evaluations" / "full" / "test_metrics.json").read_text())
    recall = {r["class"]: r["recall"] for r in scored["per_class"]}
    assert set(recall) == {"a", "b", "c", "d", "e"} and recall["a"] > 0.5   # a new class, scored under its name
    capsys.readouterr()
    # nothing new to learn: one line
    assert main(["extend", str(run), "--data", str(old), "--name", "ext2"]) == 2
    assert "brings no class" in "".join(capsys.readouterr())


@pytest.mark.parametrize("method", ["ewc", "ridge"])
def test_top_groups_train_the_backbone_top_on_cached_maps_and_the_saved_model_agrees(tmp_path, method):
    """ewc trains the top on every task; ridge adapts it on the first task, then fits on its features."""
    from graftnet.continual.top import MapsBelow, Top
    from graftnet.model import build_model
    model, spec = build_model(cfg(**{"backbone.name": TINY, "backbone.pretrained": False,
                                     "backbone.image_size": 32}), ["a", "b", "c", "d"])
    model.eval()
    images = torch.randn(48, 3, 32, 32)
    with torch.no_grad():
        maps = MapsBelow(model, 2).features(images)
    labels = torch.arange(4).repeat(12)
    table = TaskTable({s: maps for s in ("train", "val", "test")}, {s: labels for s in ("train", "val", "test")},
                      {s: labels // 2 for s in ("train", "val", "test")}, list("abcd"), ["t0", "t1"],
                      [torch.arange(0, 2), torch.arange(2, 4)])
    s = ContinualSettings(methods=[method], top_groups=2, ewc_lambda=10.0, projection=16)
    learner = Learner(table, method, 0, s, cfg(), tmp_path / "top", base=model)
    learner.run()
    head, _ = learner.final_head()
    assert isinstance(head, Top)
    saved = head.into(model).eval()
    body, stock = saved.extractor.model, model.extractor.model
    assert torch.equal(body.conv_stem.weight, stock.conv_stem.weight) and all(   # below: frozen
        torch.equal(a, b) for a, b in zip(body.blocks[0].parameters(), stock.blocks[0].parameters()))
    assert not torch.equal(body.conv_head.weight, stock.conv_head.weight)                      # the top trained
    with torch.no_grad():   # the saved model on images = the learner's top on the cached maps
        assert torch.allclose(saved(images), learner.logits(maps), atol=1e-4)


def test_methods_table_shows_forgetting_within_task_for_class_incremental_only():
    from graftnet.continual.report import table_header, table_rows
    m = {"runs": 1, "metrics": {"forgetting": {"mean": 0.1, "sd": None, "n": 1}}, "seconds": {"mean": 1.0}}
    cls = {"scenario": "class", "methods": {"ridge": {**m, "within_metrics": {"forgetting": {"mean": 0.02, "sd": None, "n": 1}}}}}
    header = table_header(cls)
    at = header.index("forgetting within task")
    assert header[at - 1] == "forgetting"
    row = table_rows(cls)[0]
    assert len(row) == len(header) + 3 and row[1 + at] == "2.00" and row[at] == "10.00"
    task = {"scenario": "task", "methods": {"naive": m}}   # its matrix is within-task already
    assert "forgetting within task" not in table_header(task) and len(table_rows(task)[0]) == len(table_header(task)) + 3
