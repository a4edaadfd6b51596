"""`graft auto` on the tiny random backbone: the plan of a dry run, one whole run within its budget
(deployment folder, model card, decisions), resume, an impossible latency bound and bad input."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from graftnet.auto import parse_budget
from graftnet.auto.stages import choose, tta
from graftnet.cli import main
from graftnet.errors import ConfigError, GraftError
from graftnet.train.callbacks import register_callback
from graftnet.train.loop import Callback

from .conftest import TINY, make_folder

BUDGET_S = 45
# Beyond the budget's 10%: the search's last trial may still be running when its share ends, and the
# export's time is an estimate, not a reservation; on this 2-core machine either runs a few seconds over.
SLACK_S = 8


def flags(data: Path, tmp: Path, *extra: str) -> list[str]:
    return ["auto", "--data", str(data), "--backbones", f"{TINY}:32", "--out", str(tmp / "runs"),
            "--set", "backbone.pretrained=false", "--set", f"cache_dir={tmp / 'cache'}",
            "--set", "data.workers=1", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One whole run with a latency bound no model can meet; (folder, wall seconds)."""
    tmp = tmp_path_factory.mktemp("auto")
    data = make_folder(tmp / "data", n=14)
    began = time.monotonic()
    code = main(flags(data, tmp, "--budget", f"{BUDGET_S}s", "--name", "a", "--max-latency-ms", "1e-6"))
    assert code == 0
    return tmp / "runs" / "a", time.monotonic() - began


def test_budget_text():
    assert parse_budget("90s") == 90 and parse_budget("30m") == 1800 and parse_budget("1h") == 3600
    assert parse_budget("1h30m") == 5400 and parse_budget("45") == 45 and parse_budget("1.5h") == 5400
    for bad in ("soon", "30m1h", "0", "-5", "1m1m", "", "nan"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_budget(bad)


def test_dry_run_prints_the_plan_and_trains_nothing(image_folder, tmp_path, capsys):
    assert main(flags(image_folder, tmp_path, "--budget", "60s", "--name", "d", "--dry-run")) == 0
    out = capsys.readouterr().out
    for stage in ("probe", "search", "finetune", "export", "deploy"):
        assert stage in out
    assert "plan for a budget of 1m00s" in out
    assert not (tmp_path / "runs").exists()


def test_the_run_ends_within_its_budget(finished):
    folder, seconds = finished
    assert seconds <= BUDGET_S * 1.1 + SLACK_S
    decisions = json.loads((folder / "decisions.json").read_text())
    assert decisions["result"]["within_budget"] and decisions["spent_s"] <= BUDGET_S * 1.1


def test_the_deployment_folder(finished):
    from graftnet.export.runtime import OnnxClassifier
    folder, _ = finished
    for name in ("model.onnx", "preprocess.json", "MODEL_CARD.md", "report.html", "decisions.json",
                 "test_metrics.json"):
        assert (folder / name).is_file(), name
    pre = json.loads((folder / "preprocess.json").read_text())
    clf = OnnxClassifier(folder / pre["model"])
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 24, 24), dtype=np.uint8)
    assert clf.logits(list(x)).shape == (2, 3)
    card = (folder / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n") and "## Evaluation" in card and "95% Wilson interval" in card
    assert "graft auto --data" in card and "--budget 45s" in card
    assert "batch 1, the fastest of 5 rounds' medians, timed in turns" in card   # what its latency is
    decisions = json.loads((folder / "decisions.json").read_text())
    stages = decisions["stages"]
    assert [s for s in stages if stages[s]["status"] not in ("done", "skipped")] == []
    assert stages["search"]["numbers"]["val_acc"] > 0 and stages["search"]["numbers"]["trials"] >= 1
    assert decisions["probe"]["chosen"]["images_per_s"] > 0 and decisions["plan"]["estimates"]["features"] > 0
    report = (folder / "report.html").read_text()
    assert all(f"Stage: {s}" in report for s in stages)
    # the test split was scored once, for the shipped file only
    assert json.loads((folder / "test_metrics.json").read_text())["model"] == pre["model"]
    assert not list((folder / "search").glob("trials/*/evaluations"))


def test_an_impossible_latency_bound_is_said_and_the_fastest_ships(finished):
    folder, _ = finished
    decisions = json.loads((folder / "decisions.json").read_text())
    export = decisions["stages"]["export"]
    assert export["numbers"]["meets"] is False
    assert export["decision"].startswith("no model meets --max-latency-ms 1e-06")
    models = export["numbers"]["models"]
    fastest = min(m["latency_ms"] for m in models.values() if "latency_ms" in m)
    assert models[export["numbers"]["model"]]["latency_ms"] <= 1.1 * fastest
    assert all("latency_ms_once" in m for m in models.values() if "error" not in m)   # timed in turns
    assert decisions["result"]["meets_latency"] is False
    assert "no model meets" in (folder / "report.html").read_text()
    # pruning was weighed and refused: a millionth of a millisecond would take nearly every channel
    prune = decisions["stages"]["prune"]
    assert prune["status"] == "skipped" and "more than the 50%" in prune["decision"]


def test_resume_runs_only_the_stages_that_did_not_finish(finished):
    folder, _ = finished
    path = folder / "decisions.json"
    before = json.loads(path.read_text())
    trials = sorted(p.name for p in (folder / "search" / "trials").iterdir())
    before["stages"]["deploy"]["status"] = "running"   # as a kill during the deployment leaves it
    path.write_text(json.dumps(before))
    tested = (folder / "test_metrics.json").stat().st_mtime_ns
    assert main(["auto", "--resume", str(folder)]) == 0
    after = json.loads(path.read_text())
    for name in ("look", "probe", "search", "finetune", "export"):
        assert after["stages"][name] == before["stages"][name], name
    assert after["stages"]["deploy"]["attempts"] == 2 and after["stages"]["deploy"]["status"] == "done"
    assert sorted(p.name for p in (folder / "search" / "trials").iterdir()) == trials
    # the same file ships: its test score is read back, not measured again
    assert (folder / "test_metrics.json").stat().st_mtime_ns == tested


def test_resume_after_a_kill_in_the_export_measures_again(finished):
    folder, _ = finished
    path = folder / "decisions.json"
    before = json.loads(path.read_text())
    before["stages"]["export"]["status"] = "running"
    path.write_text(json.dumps(before))
    assert main(["auto", "--resume", str(folder)]) == 0
    after = json.loads(path.read_text())
    assert after["stages"]["search"] == before["stages"]["search"]
    assert after["stages"]["export"]["attempts"] == 2 and after["stages"]["export"]["started"] >= before["stages"]["export"]["started"]
    assert after["stages"]["deploy"]["attempts"] == 3 and (folder / "model.onnx").is_file()


def test_fine_tuning_is_kept_within_one_standard_error_of_the_searched_head():
    from graftnet.auto.stages import finetune_kept
    assert finetune_kept(0.83, 0.83, 100)[0] and finetune_kept(0.80, 0.83, 100)[0]   # 3.8 points of noise
    assert not finetune_kept(0.78, 0.83, 100)[0]
    keep, margin = finetune_kept(0.866, 0.87, 5000)
    assert keep and margin == pytest.approx(0.00476, abs=1e-4) and not finetune_kept(0.86, 0.87, 5000)[0]


def test_the_choice_of_the_shipped_model():
    models = {"fp32": {"val_acc": 0.90, "latency_ms": 4.0, "size_mb": 4.0},
              "int8": {"val_acc": 0.898, "latency_ms": 2.0, "size_mb": 1.0}}
    assert choose(models, None)["model"] == "int8"                  # within 0.5 points: the smaller one
    assert choose(models, 3.0) == {**choose(models, 3.0), "model": "int8", "meets": True}
    models["int8"]["val_acc"] = 0.85
    assert choose(models, None)["model"] == "fp32"
    assert choose(models, 3.0)["model"] == "int8"                   # fp32 is too slow
    assert choose({**models, "int8": {"error": "quantization failed"}}, None)["model"] == "fp32"
    none = choose(models, 1.0)
    assert none["model"] == "int8" and not none["meets"] and "no model meets" in none["why"]
    # as fast within measurement noise (10%): the smaller file ships, whichever timed faster this time
    models["int8"].update(val_acc=0.9, latency_ms=4.2)
    assert choose(models, None)["model"] == "int8" and choose(models, 1.0)["model"] == "int8"
    # test-time flips are not even tried where the time or the latency bound has no room for them
    model = {"val_acc": 0.9, "latency_ms": 2.0, "model": "unused.onnx"}
    assert "not tried" in tta(model, "run", left=5.0, cost=10.0, max_latency_ms=None)["why"]
    assert "twice the latency" in tta(model, "run", left=50.0, cost=10.0, max_latency_ms=3.0)["why"]


@pytest.mark.parametrize("args, message", [
    (["--budget", "soon"], "--budget soon: expected a positive duration"),
    (["--budget", "2s"], "too small"),
    (["--budget", "1m", "--backbones", "x:big"], "--backbones"),
])
def test_bad_input_is_one_line_and_writes_nothing(image_folder, tmp_path, capsys, args, message):
    assert main(flags(image_folder, tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_missing_data_and_a_folder_that_is_not_an_auto_folder(tmp_path, capsys):
    assert main(flags(tmp_path / "nowhere", tmp_path, "--budget", "1m")) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and len(err.splitlines()) == 1
    (tmp_path / "run").mkdir()
    assert main(["auto", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a `graft auto` folder" in err and len(err.splitlines()) == 1


def test_a_set_too_large_for_the_budget_is_sliced_to_fit():
    from graftnet.auto.plan import slice_to_fit
    data = {"per_class": {"a": 5000, "b": 5000}}
    plan = {"estimates": {"decode": 100.0, "features": 900.0}, "left_s": 600.0, "reserve_s": 100.0}
    cap = slice_to_fit(data, plan)          # half of the 500 s after the export, less a trial: 245 s
    assert cap == int(5000 * 245 / 1000)
    assert slice_to_fit(data, {**plan, "left_s": 110.0}) is None


class _CtrlC(Callback):
    """Ctrl-C at the end of the first fine-tuning epoch: the search's trials are left alone."""

    def __init__(self, options):
        pass

    def after_epoch(self, state, row: dict) -> None:
        if state.stage == "fine-tuning":
            raise KeyboardInterrupt


@dataclass
class _NoOptions:
    pass


register_callback("auto_test_ctrl_c", _NoOptions)(_CtrlC)


def test_ctrl_c_in_fine_tuning_ships_the_best_model_so_far(tmp_path):
    data = make_folder(tmp_path / "data", n=14)
    config = tmp_path / "base.yaml"
    config.write_text("callbacks: {auto_test_ctrl_c: {}}\n")
    assert main(flags(data, tmp_path, "--budget", f"{BUDGET_S}s", "--name", "c", "--config", str(config))) == 0
    folder = tmp_path / "runs" / "c"
    decisions = json.loads((folder / "decisions.json").read_text())
    assert decisions["stages"]["finetune"]["status"] == "interrupted"
    assert decisions["result"]["interrupted"] == "finetune"
    assert decisions["stages"]["deploy"]["status"] == "done" and (folder / "model.onnx").is_file()
    assert decisions["result"]["run"] == decisions["stages"]["search"]["numbers"]["run"]


def test_fine_tuning_moves_to_a_smaller_input_only_when_an_epoch_fits_there():
    from graftnet.auto.plan import epochs_that_fit, make_plan, smaller_sizes
    assert smaller_sizes(160) == [144, 128] and smaller_sizes(224) == [208, 192, 176] and smaller_sizes(32) == []
    data = {"counts": {"train": 40_000, "val": 5_000, "test": 10_000}}
    # at 160 px: the backbone pass 180 s, a fine-tuning epoch 40,000 / 40 + 20 = 1020 s
    probe = {"chosen": {"image_size": 160, "params_m": 3.4}, "images_per_s": 250.0, "train_images_per_s": 40.0,
             "decode_images_per_s": 4000.0}
    at160 = make_plan(data, probe, 2400.0)
    assert at160["image_size"] == 160 and at160["finetune_epochs"] == 1 and at160["size_reason"] is None
    # less time: an epoch no longer fits at 160 px, it does at 128 px (0.64 of the pixels)
    moved = make_plan(data, probe, 1500.0)
    assert moved["image_size"] in (144, 128) and moved["finetune_epochs"] >= 1
    assert moved["estimates"]["finetune_epoch"] < at160["estimates"]["finetune_epoch"]
    assert "instead of the probe's 160" in moved["size_reason"]
    assert moved["search_s"] + moved["finetune_s"] + moved["reserve_s"] == pytest.approx(1500.0, abs=1.0)
    # a search that ends a little late (here by 2% of an epoch) still leaves fine-tuning its epoch
    late = moved["finetune_s"] - 0.02 * moved["estimates"]["finetune_epoch"]
    assert epochs_that_fit(moved, late) == moved["finetune_epochs"]
    assert epochs_that_fit(moved, moved["finetune_s"] - 0.5 * moved["estimates"]["finetune_epoch"]) < moved["finetune_epochs"]
    # a latency bound reserves pruning's recovery epoch and export when they take at most a third of the room
    roomy = make_plan(data, probe, 6000.0)
    bound = make_plan(data, probe, 6000.0, prune=True)
    assert roomy["prune_s"] == 0 and bound["prune_s"] > roomy["estimates"]["finetune_epoch"]
    assert bound["search_s"] + bound["finetune_s"] + bound["reserve_s"] == pytest.approx(6000.0, abs=1.0)
    assert bound["finetune_epochs"] < roomy["finetune_epochs"]
    tight = make_plan(data, probe, 2400.0, prune=True)
    assert tight["prune_s"] == 0 and "not reserved" in tight["prune_reason"]
    # too little for an epoch even at 128 px: the probe's size, frozen, as before
    frozen = make_plan(data, probe, 600.0)
    assert frozen["image_size"] == 160 and frozen["finetune_epochs"] == 0 and "one fine-tuning epoch" in frozen["finetune_reason"]


def test_pruning_for_a_latency_bound(finished, tmp_path):
    """The finished run's shipped model pruned as far as a bound 0.8x its latency asks: a smaller
    network, measured again; a bound that would take most channels is refused with its reason."""
    from graftnet.auto.stages import MAX_PRUNE, prune_amount, prune_for_latency
    assert prune_amount(1.0, 1.0) == pytest.approx(1 - 1 / 1.2)
    assert prune_amount(3.0, 1.0) > MAX_PRUNE and prune_amount(1.0, 2.0) == 0.05
    folder, _ = finished
    exported = json.loads((folder / "decisions.json").read_text())["stages"]["export"]["numbers"]
    fastest = min(m["latency_ms"] for m in exported["models"].values() if "error" not in m)
    r = prune_for_latency(exported, 0.8 * fastest, tmp_path, left=1.0, epoch_s=10.0, seed=0, resume=False, gap=0.0)
    assert r["pruned"] and r["amount"] == pytest.approx(prune_amount(fastest, 0.8 * fastest), abs=1e-3)
    assert r["recovery_epochs"] == 0 and r["macs_ratio"] < 1.0
    assert Path(r["run"]) == tmp_path / "pruned" and (tmp_path / "pruned" / "prune.json").is_file()
    assert r["models"]["fp32"]["val_acc"] == r["val_acc_after"] and r["models"]["fp32"]["latency_ms"] > 0
    again = prune_for_latency(exported, 0.8 * fastest, tmp_path, left=1.0, epoch_s=10.0, seed=0, resume=True, gap=0.0)
    assert again["run"] == r["run"] and again["val_acc_after"] == r["val_acc_after"]   # a finished prune is kept
    refused = prune_for_latency(exported, fastest / 100, tmp_path / "x", left=1e9, epoch_s=1.0, seed=0, resume=False)
    assert not refused["pruned"] and "more than the 50%" in refused["why"] and not (tmp_path / "x").exists()
    late = prune_for_latency(exported, 0.8 * fastest, tmp_path / "y", left=0.0, epoch_s=1.0, seed=0, resume=False)
    assert not late["pruned"] and "no time left" in late["why"] and not (tmp_path / "y").exists()
    recovered = prune_for_latency(exported, 0.8 * fastest, tmp_path / "z", left=100.0, epoch_s=10.0, seed=0,
                                  resume=False)
    assert recovered["recovery_epochs"] == 1 and recovered["models"]["int8"].get("latency_ms", 1) > 0


def test_latencies_a_bound_is_decided_on_are_timed_in_turns(finished, tmp_path, monkeypatch):
    """Every measured model of every group is timed again in one call of retime_apart (rounds in turns);
    the first timing is kept beside it; a failed model is left as it was; a model doing four times
    the work is slower in the same turns."""
    from graftnet.auto import stages
    from graftnet.export.merge import merge_onnx
    from graftnet.export import runtime as runtime_mod
    folder, _ = finished
    exported = json.loads((folder / "decisions.json").read_text())["stages"]["export"]["numbers"]["models"]
    fp32 = {k: v for k, v in exported["fp32"].items() if k != "latency_ms_once"}   # as measure gives it
    four = merge_onnx([fp32["model"]] * 4, tmp_path / "four.onnx")
    calls = []
    real = runtime_mod.retime_apart
    monkeypatch.setattr(runtime_mod, "retime_apart", lambda models, **kw: calls.append(set(models)) or real(models, **kw))
    one, other = stages.timed_together({"fp32": {**fp32, "latency_ms": 99.0}, "int8": {"error": "no"}},
                                       {"four": {**fp32, "model": str(four), "latency_ms": 0.001}})
    assert calls == [{"0/fp32", "1/four"}]   # one call, one child process: every model in the same turns
    assert one["int8"] == {"error": "no"} and one["fp32"]["latency_ms_once"] == 99.0
    assert other["four"]["latency_ms_once"] == 0.001
    assert 0 < one["fp32"]["latency_ms"] < other["four"]["latency_ms"] < 99.0
    # the fastest of the rounds is the one judged; their median is kept beside it
    assert one["fp32"]["latency_ms"] <= one["fp32"]["latency_ms_median"]
    again, = stages.timed_together(one)   # the first timing stays the first
    assert again["fp32"]["latency_ms_once"] == 99.0
    with pytest.raises(GraftError, match="separate process failed: .*none.onnx: no such ONNX model"):
        real({"x": tmp_path / "none.onnx"})
    # rounds a second apart, less under a 10-minute budget: the gaps stay under 1% of it
    assert stages.round_gap(600) == stages.round_gap(3600) == 1.0 and stages.round_gap(45) == 0.075


def test_a_smaller_input_for_a_latency_bound(finished, tmp_path, monkeypatch):
    """Before pruning, the run fine-tuned on for an epoch at the largest smaller input the bound is
    estimated to allow (latency taken to scale with the side to the 1.1, 1.2x under the bound,
    16-px steps, down to half the side); refused with its reason when no size qualifies or no time
    is left."""
    from graftnet.auto import stages
    from graftnet.config import resolve
    assert stages.smaller_size(160, 1.97, 1.25) == 80 and stages.smaller_size(160, 1.0, 1.0) == 128
    assert stages.smaller_size(160, 1.5, 1.25) == 112   # 1.5 * (112/160)^1.1 = 1.02 ms <= 1.25 / 1.2
    assert stages.smaller_size(160, 10.0, 1.0) is None and stages.smaller_size(160, 1.0, 2.0) is None
    folder, _ = finished
    exported = json.loads((folder / "decisions.json").read_text())["stages"]["export"]["numbers"]
    fastest = min(m["latency_ms"] for m in exported["models"].values() if "error" not in m)
    tiny = stages.smaller_input(exported, 0.8 * fastest, tmp_path, left=1e9, epoch_s=1.0, resume=False)
    assert not tiny["resized"] and "no smaller input down to 64 px" in tiny["why"]   # 32 px already
    size = resolve(Path(exported["run"]) / "config.yaml").backbone.image_size
    monkeypatch.setattr(stages, "smaller_size", lambda s, latency, bound: s - 8)
    late = stages.smaller_input(exported, 0.8 * fastest, tmp_path, left=0.5, epoch_s=1.0, resume=False)
    assert not late["resized"] and "does not fit" in late["why"] and not list(tmp_path.iterdir())
    r = stages.smaller_input(exported, 0.8 * fastest, tmp_path, left=600.0, epoch_s=1.0, resume=False, gap=0.0)
    assert r["resized"] and r["image_size"] == size - 8 and r["epochs_run"] == 1
    assert resolve(Path(r["run"]) / "config.yaml").backbone.image_size == size - 8
    assert r["models"]["fp32"]["val_acc"] == r["val_acc"] and r["models"]["fp32"]["latency_ms"] > 0


def test_fine_tuning_trains_the_top_groups_and_the_probe_times_those(finished):
    """The fine-tuning run trains the top 5/8 of the backbone's groups at the recipe's rates, with
    RandAugment only on a long schedule; the probe times steps with exactly those groups trained."""
    import torch
    from graftnet.auto.probe import _train_rate
    from graftnet.auto.stages import RANDAUGMENT_FROM, finetune_settings, top_groups
    from graftnet.config import resolve
    from graftnet.data.images import ImageSet
    from graftnet.model import load_model
    from graftnet.train.finetune import backbone_groups
    assert [top_groups(n) for n in (1, 2, 5, 8, 12)] == [1, 1, 3, 5, 8]
    assert finetune_settings(RANDAUGMENT_FROM - 1, 8)["finetune.augment"] == "flip"
    short = finetune_settings(2, 8)
    assert short["finetune.unfreeze"] == "top:5" and short["finetune.augment"] == "flip"
    assert finetune_settings(RANDAUGMENT_FROM, 8)["finetune.augment"] == "randaugment"
    folder, _ = finished
    decisions = json.loads((folder / "decisions.json").read_text())
    assert decisions["stages"]["finetune"]["status"] == "done"
    run = Path(decisions["stages"]["finetune"]["numbers"]["run"])
    model, _ = load_model(run)
    groups = backbone_groups(model)
    ft = resolve(run / "config.yaml").finetune
    assert len(groups) > top_groups(len(groups)) and ft.unfreeze == f"top:{top_groups(len(groups))}"
    assert (ft.lr, ft.lr_decay) == (5e-4, 0.8)
    assert ft.augment == ("randaugment" if ft.epochs >= RANDAUGMENT_FROM else "flip")
    images = ImageSet([torch.zeros(3, 24, 24, dtype=torch.uint8)] * 4, torch.tensor([0, 1, 2, 0]),
                      ["a", "b", "c", "d"], ["x", "y", "z"])
    assert _train_rate(model, images, 24, [0.5] * 3, [0.25] * 3, resolve(run / "config.yaml"), batch=4, steps=1) > 0
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    low = set(groups[0].params)
    top = set(groups[-1].params)
    assert not (low & trained) and top <= trained


def test_an_ensemble_is_planned_only_when_fine_tuning_has_all_its_epochs():
    from graftnet.auto.plan import MAX_MEMBERS, make_plan
    data = {"counts": {"train": 3_000, "val": 500, "test": 1_000}}
    probe = {"chosen": {"image_size": 128, "params_m": 3.4}, "images_per_s": 300.0, "train_images_per_s": 60.0,
             "decode_images_per_s": 4000.0}
    short = make_plan(data, probe, 900.0)          # an epoch about 52 s: fewer than 10 fit
    assert short["finetune_epochs"] < 10 and short["members"] == 1 and short["ensemble_s"] == 0
    assert "its fine-tuning epochs take the time" in short["ensemble_reason"]
    roomy = make_plan(data, probe, 6000.0)
    assert roomy["finetune_epochs"] == 10 and 1 < roomy["members"] <= MAX_MEMBERS
    member = roomy["finetune_s"] + roomy["estimates"]["export"]
    assert roomy["ensemble_s"] == pytest.approx((roomy["members"] - 1) * member, abs=0.1)
    assert roomy["search_s"] + roomy["finetune_s"] + roomy["ensemble_s"] + roomy["reserve_s"] == pytest.approx(6000.0, abs=1.0)
    assert roomy["search_s"] >= roomy["estimates"]["features"]
    huge = make_plan(data, probe, 60_000.0)
    assert huge["members"] == MAX_MEMBERS and huge["distill_s"] == 0
    # a latency bound also reserves one model's epochs taught by the members (their passes in each step)
    bound = make_plan(data, probe, 60_000.0, prune=True)
    teach = bound["finetune_s"] + bound["finetune_epochs"] * bound["members"] * bound["estimates"]["teacher_epoch"] * 1.15
    assert bound["members"] > 1 and bound["distill_s"] == pytest.approx(teach + bound["estimates"]["export"], rel=0.01)
    assert sum(bound[k] for k in ("search_s", "finetune_s", "ensemble_s", "distill_s", "reserve_s")) == pytest.approx(60_000.0, abs=1.0)


def test_an_ensemble_of_fine_tuned_members_ships_as_one_file(finished, tmp_path):
    """The ensemble stage's pieces on the finished run's head: a member fine-tuned from another seed,
    both merged into one ONNX file (fp32 and int8) that ships only when it beats the best single
    model by 0.5 points, and the deployment folder that holds it; a member the deadline stops early
    is left out."""
    from graftnet.auto import stages
    from graftnet.auto.deploy import write_deployment
    from graftnet.config import resolve
    from graftnet.export.runtime import OnnxClassifier
    folder, _ = finished
    decisions = json.loads((folder / "decisions.json").read_text())
    head = decisions["stages"]["search"]["numbers"]["run"]
    first = stages.finetune(head, tmp_path, 1, time.monotonic() + 600, resume=False)["run"]
    grown = stages.ensemble_members(first, tmp_path, 1, time.monotonic() + 600, resume=False)
    assert len(grown["runs"]) == 1 and 0 <= grown["val_accs"][0] <= 1
    second = resolve(Path(grown["runs"][0]) / "config.yaml")
    assert second.train.seed == resolve(Path(first) / "config.yaml").train.seed + 1
    assert second.train.init == head and second.finetune.unfreeze.startswith("top:")
    models = stages.measure(first)
    models.update(stages.measure_ensemble([first, *grown["runs"]], models, tmp_path / "ensemble"))
    assert {"ensemble-fp32", "ensemble-int8"} <= set(models)
    assert models["ensemble-int8"]["members"] == [first, *grown["runs"]]
    assert OnnxClassifier(models["ensemble-int8"]["model"]).logits(
        list(np.zeros((1, 3, 24, 24), np.uint8))).shape == (1, 3)   # preprocess.json lies beside it
    # the ensemble ships only from 0.5 points above the best single model
    scored = {k: {**m, "val_acc": 0.9} for k, m in models.items()}
    scored["ensemble-int8"]["val_acc"] = 0.904
    assert not choose(scored, None)["model"].startswith("ensemble")
    scored["ensemble-int8"]["val_acc"] = 0.91
    assert choose(scored, None)["model"] == "ensemble-int8"
    out = tmp_path / "deploy"
    out.mkdir()
    result = write_deployment(out, decisions, {"run": first, "models": scored, "model": "ensemble-int8",
                                               "meets": True, "tta": {"used": False}}, "graft auto ...")
    pre = json.loads((out / "preprocess.json").read_text())
    assert result["model"] == pre["model"] == "model.ensemble.int8.onnx" and pre["ensemble_members"] == [first, *grown["runs"]]
    assert (out / "model.onnx").is_file() and not (out / "model.ensemble.onnx").exists()
    x = np.random.default_rng(0).integers(0, 255, (2, 3, 24, 24), dtype=np.uint8)
    assert np.allclose(np.exp(OnnxClassifier(out / pre["model"]).logits(list(x))).sum(1), 1.0, atol=1e-4)
    assert "ensemble" in (out / "MODEL_CARD.md").read_text()
    # a member the deadline stops before its last epoch is left out; one that ends past it is kept whole
    two = stages.finetune(head, tmp_path / "two", 2, time.monotonic() + 600, resume=False)["run"]
    late = stages.ensemble_members(two, tmp_path / "late", 1, time.monotonic() - 1, resume=False)
    assert late["runs"] == [] and "left out" in late["why"]
    ended = stages.ensemble_members(first, tmp_path / "ended", 1, time.monotonic() - 1, resume=False)
    assert len(ended["runs"]) == 1 and ended["why"] is None
    # a latency bound that rules the winning ensemble out asks for one model taught by it (latencies
    # set here: the tiny models' measured ones are too close to each other to order reliably)
    for name, ms in {"fp32": 2.0, "int8": 1.0, "ensemble-fp32": 4.0, "ensemble-int8": 2.0}.items():
        scored[name]["latency_ms"] = ms
    bounded = choose(scored, 1.05)
    assert bounded["model"] == "int8" and "over --max-latency-ms" in stages.distillation_needed(scored, bounded, 1.0)
    assert stages.distillation_needed(scored, choose(scored, None), None) is None
    scored["ensemble-int8"]["val_acc"] = 0.9
    assert stages.distillation_needed(scored, bounded, 1.0) is None   # the ensemble does not win
    taught = stages.distill_ensemble([first, *grown["runs"]], tmp_path, 1, time.monotonic() + 600, resume=False)
    student = resolve(Path(taught["run"]) / "config.yaml")
    assert taught["epochs_run"] == 1 and 0 <= taught["val_acc"] <= 1 and student.train.init == first
    assert json.loads((Path(taught["teacher"]) / "ensemble.json").read_text())["members"][1]["absolute"] == \
        str(Path(grown["runs"][0]).resolve())
    assert not list(Path(taught["run"]).glob("evaluations")) and not list(Path(taught["teacher"]).glob("evaluations"))


def test_a_resolution_step_is_planned_only_for_one_model_with_all_its_epochs():
    """The step to a larger input takes the time a second member cannot use, stops at the weights'
    native input, never runs under a latency bound, and the plan's shares still sum to the budget."""
    from graftnet.auto.plan import RESOLUTION_EPOCHS, estimates, larger_size, make_plan
    assert larger_size(160, 224) == 192 and larger_size(128, 224) == 160 and larger_size(192, 224) == 224
    assert larger_size(224, 224) is None and larger_size(160, None) is None
    data = {"counts": {"train": 3_000, "val": 500, "test": 1_000}}
    probe = {"chosen": {"image_size": 128, "params_m": 3.4, "native_size": 224}, "images_per_s": 300.0,
             "train_images_per_s": 60.0, "decode_images_per_s": 4000.0}

    def total(p):
        return sum(p[k] for k in ("search_s", "finetune_s", "resolution_s", "ensemble_s", "distill_s", "reserve_s"))
    short = make_plan(data, probe, 900.0)     # fewer than 10 epochs fit: they take the time
    assert short["finetune_epochs"] < 10 and short["resolution_size"] is None and short["resolution_s"] == 0
    assert "own epochs take the time" in short["resolution_reason"]
    budgets = [make_plan(data, probe, float(b)) for b in range(1500, 6001, 150)]
    stepped = [p for p in budgets if p["resolution_size"]]
    assert stepped, "some budget between 25 and 100 minutes has all 10 epochs, no second member and a step"
    for p in stepped:
        assert p["resolution_size"] == 160 and p["members"] == 1 and p["finetune_epochs"] == 10
        at = estimates(data, probe, 160)
        assert p["resolution_s"] > RESOLUTION_EPOCHS * at["finetune_epoch"]
        assert total(p) == pytest.approx(p["left_s"], abs=1.0) and p["search_s"] >= p["estimates"]["features"]
    # with a member: no step, and the plan says nothing about one
    assert all(p["resolution_size"] is None for p in budgets if p["members"] > 1)
    roomy = make_plan(data, probe, 60_000.0)
    assert roomy["members"] > 1 and roomy["resolution_size"] is None and "members" in roomy["resolution_reason"]
    native = make_plan(data, {**probe, "chosen": {**probe["chosen"], "native_size": 128}}, stepped[0]["left_s"])
    assert native["resolution_size"] is None and "native input" in native["resolution_reason"]
    bound = [make_plan(data, probe, p["left_s"], prune=True) for p in stepped]
    assert all(b["resolution_size"] is None for b in bound)
    assert any("--max-latency-ms" in (b["resolution_reason"] or "") for b in bound)


def test_the_resolution_step_goes_on_from_the_fine_tuned_model_at_a_larger_input(finished, tmp_path):
    from graftnet.auto import stages
    from graftnet.config import resolve
    from graftnet.model import load_model
    folder, _ = finished
    tuned = json.loads((folder / "decisions.json").read_text())["stages"]["finetune"]["numbers"]["run"]
    r = stages.resolution_step(tuned, tmp_path, 48, 1, time.monotonic() + 600, resume=False)
    cfg, src = resolve(Path(r["run"]) / "config.yaml"), resolve(Path(tuned) / "config.yaml")
    assert Path(r["run"]) == tmp_path / "resolution-48" and r["epochs_run"] == 1 and 0 <= r["val_acc"] <= 1
    assert cfg.backbone.image_size == 48 and src.backbone.image_size == 32 and cfg.train.init == tuned
    assert cfg.finetune.unfreeze == src.finetune.unfreeze and cfg.train.epochs == 0
    assert stages.measure(r["run"])["fp32"]["latency_ms"] > 0   # exports at its own input size
    assert load_model(r["run"])[1].image_size == 48
    again = stages.resolution_step(tuned, tmp_path, 48, 1, time.monotonic() + 600, resume=True)
    assert again["run"] == r["run"] and again["val_acc"] == r["val_acc"]   # a finished step is kept on resume
    late = stages.resolution_step(tuned, tmp_path / "late", 48, 3, time.monotonic() - 1, resume=False)
    assert late["stopped_at_deadline"] and late["epochs_run"] == 1
    # past the deadline after its only epoch: nothing was cut short (an ensemble member would be kept)
    last = stages.resolution_step(tuned, tmp_path / "last", 48, 1, time.monotonic() - 1, resume=False)
    assert not last["stopped_at_deadline"] and last["epochs_run"] == 1


def test_a_whole_run_with_a_resolution_step_ships_the_larger_model(tmp_path, monkeypatch):
    """The runner's wiring: a plan with a step (forced here: the tiny set's plan has no room for one)
    runs it after fine-tuning and, when kept, exports and ships the larger model."""
    from graftnet.auto import plan as plan_mod
    from graftnet.auto import stages
    make = plan_mod.make_plan

    def with_step(*a, **k):
        p = make(*a, **k)
        p.update(resolution_size=40, resolution_s=10.0, resolution_reason="forced", search_s=p["search_s"] - 10.0)
        return p
    monkeypatch.setattr(plan_mod, "make_plan", with_step)
    monkeypatch.setattr(stages, "MIN_STEP_GAIN", -1.0)    # kept whatever it scores
    data = make_folder(tmp_path / "data", n=14)
    assert main(flags(data, tmp_path, "--budget", f"{BUDGET_S}s", "--name", "r")) == 0
    decisions = json.loads((tmp_path / "runs" / "r" / "decisions.json").read_text())
    step = decisions["stages"]["resolution"]
    assert step["status"] == "done" and step["numbers"]["kept"] and step["numbers"]["image_size"] == 40
    assert decisions["stages"]["export"]["numbers"]["run"] == step["numbers"]["run"]
    pre = json.loads((tmp_path / "runs" / "r" / "preprocess.json").read_text())
    assert pre["image_size"] == 40 and "resolution: " in (tmp_path / "runs" / "r" / "MODEL_CARD.md").read_text()
