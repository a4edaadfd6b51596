"""The training lifecycle: a method joins as a callback plus a config entry, carries its state
through checkpoints, and a run folder is made, logged into and cleaned up the same way everywhere."""
import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from graftnet import config
from graftnet.errors import ConfigError
from graftnet.train.callbacks import build_callbacks
from graftnet.train.loop import Callback, State, fit
from graftnet.train.pipeline import train

from .conftest import ROOT, tiny_overrides

# A penalty that graftnet does not have: an L2 pull of the head's weights toward where they were at
# the first step, with state of its own (the anchor, the steps it saw, the penalty summed). It is
# defined, registered and named in the config here only: no edit to the pipeline.
PLUGIN = '''
import json, os, signal, sys
from dataclasses import dataclass
import torch
from graftnet import config
from graftnet.train.callbacks import register_callback
from graftnet.train.loop import Callback
from graftnet.train.pipeline import train


@dataclass
class PullOptions:
    strength: float = 0.1


class Pull(Callback):
    key = "pull"

    def __init__(self, options):
        self.strength, self.anchor, self.steps, self.total = options.strength, {}, 0, 0.0

    def state_dict(self):
        return {**{f"anchor.{k}": v for k, v in self.anchor.items()}, "steps": self.steps, "total": self.total}

    def load_state_dict(self, state):
        self.anchor = {k[len("anchor."):]: v for k, v in state.items() if k.startswith("anchor.")}
        self.steps, self.total = state["steps"], state["total"]

    def after_loss(self, state, loss):
        penalty = 0
        for name, p in state.model.named_parameters():
            if p.requires_grad:  # each parameter pulled toward where it was when it first trained
                anchor = self.anchor.setdefault(name, p.detach().clone())
                penalty = penalty + ((p - anchor) ** 2).sum()
        penalty = self.strength * penalty
        self.steps += 1
        self.total += penalty.item()
        return loss + penalty

    def after_epoch(self, state, row):
        if os.environ.get("KILL_AT_EPOCH") == str(state.epoch):  # before this epoch's checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    def after_run(self, job, metrics):
        (job.run_dir / "pull.json").write_text(json.dumps({"steps": self.steps, "total": self.total}))


register_callback("pull", PullOptions)(Pull)
if sys.argv[1] == "resume":
    train(None, resume=sys.argv[2])
else:
    train(config.resolve(None, json.loads(sys.argv[2])))
'''


def _run(script: Path, *args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRAFTNET_QUIET": "1", "PYTHONPATH": str(ROOT)}
    env.pop("KILL_AT_EPOCH", None)
    if kill_at is not None:
        env["KILL_AT_EPOCH"] = str(kill_at)
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_loss_term_added_by_a_callback_alone_resumes_after_sigkill_with_its_state(image_folder, tmp_path):
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    base = tiny_overrides(image_folder, tmp_path, **{"train.epochs": 2, "finetune.epochs": 2,
                                                    "finetune.unfreeze": "top:1", "finetune.augment": "none",
                                                    "train.checkpoint_minutes": 0})
    pulled = {**base, "callbacks": {"pull": {"strength": 0.5}}}
    for name, over in (("plain", base), ("ref", pulled), ("killed", pulled)):
        proc = _run(script, "new", json.dumps({**over, "name": name}), kill_at=3 if name == "killed" else None)
        assert (proc.returncode == -9) == (name == "killed"), proc.stderr[-2000:]
    runs = tmp_path / "runs"
    killed = runs / "killed"
    assert not (killed / "model.safetensors").exists()
    saved = config.resolve(killed / "config.yaml").callbacks
    assert saved == {"pull": {"strength": 0.5}}  # the config entry travels with the run
    meta_steps = json.loads(Path(killed / "metrics.jsonl").read_text().splitlines()[-1])["epoch"]
    assert meta_steps == 2  # killed in fine-tuning epoch 3, before its checkpoint
    proc = _run(script, "resume", str(killed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ref, res = (json.loads((runs / n / "pull.json").read_text()) for n in ("ref", "killed"))
    assert ref["steps"] == res["steps"] > 0  # the resumed term counted on from its checkpointed state
    assert res["total"] == pytest.approx(ref["total"], rel=1e-5)
    a, b, plain = (load_file(str(runs / n / "model.safetensors")) for n in ("ref", "killed", "plain"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k  # resume equals a run never stopped
    assert any(not torch.allclose(a[k], plain[k], atol=1e-4) for k in a)  # and the term did act


def test_callbacks_named_in_a_config_are_checked(monkeypatch):
    """Options are typed by the callback's own dataclass (so `--set callbacks.x.strength=0.5` works);
    an unknown name, an unknown option or a wrong type is one clear line; a name is registered once."""
    from dataclasses import dataclass

    from graftnet.train import callbacks as cbs

    @dataclass
    class Options:
        strength: float = 0.1
    monkeypatch.setattr(cbs, "CALLBACKS", cbs.Registry("callback"))
    cbs.register_callback("pull", Options)(lambda o: ("built", o.strength))
    assert build_callbacks({"pull": {"strength": "0.5"}}) == [("built", 0.5)]
    assert build_callbacks({"pull": None}) == [("built", 0.1)]
    with pytest.raises(ConfigError, match="did you mean pull"):
        build_callbacks({"pul": {}})
    with pytest.raises(ConfigError, match="callbacks.pull"):
        build_callbacks({"pull": {"strenght": 1}})
    with pytest.raises(ConfigError, match="callbacks.pull.strength"):
        build_callbacks({"pull": {"strength": "strong"}})
    with pytest.raises(ValueError, match="already registered"):
        cbs.register_callback("pull", Options)(lambda o: None)


def test_fit_events_and_duplicate_keys():
    """before_fit sees the fit's context; after_fit runs once when it ends; two callbacks with one
    key in a fit would overwrite each other's checkpointed state, so that is an error."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    class Spy(Callback):
        def before_fit(self, state):
            seen.append(("before", state.model is model, state.optimizer is opt, state.epochs, state.n_train))

        def after_fit(self, state):
            seen.append(("after", state.epoch))
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    fit(model, lambda: [(x, y)], 1, None, opt, 2, State(), [Spy()])
    assert seen == [("before", True, True, 2, 1), ("after", 2)]
    with pytest.raises(ValueError, match="same key"):
        fit(model, lambda: [(x, y)], 1, None, opt, 2, State(), [Spy(), Spy()])


def test_train_returns_results_and_two_runs_in_one_process_log_apart(image_folder, tmp_path):
    """train() gives back the folder, the test metrics and the best validation score; logging is per
    run (per thread), so two runs in one process each log only their own lines."""
    results, errors = {}, []

    def one(name: str, seed: int):
        try:
            results[name] = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
                "name": name, "train.seed": seed, "train.epochs": 2})))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(f"run{i}", i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, other in (("run0", "run1"), ("run1", "run0")):
        r = results[name]
        assert r.run_dir == tmp_path / "runs" / name and (r / "report.html").is_file()
        assert r.metrics["accuracy"] == json.loads((r / "test_metrics.json").read_text())["accuracy"]
        assert r.best_val == max(row["val_acc"] for row in r.history)
        text = (r / "log.txt").read_text()
        assert f"runs/{name}" in text and f"runs/{other}" not in text
        assert text.count("epoch   2/2") == 1


def test_a_crash_of_any_kind_leaves_no_half_made_run(image_folder, tmp_path):
    class Boom(Callback):
        def before_fit(self, state):
            raise RuntimeError("a bug in a callback")
    with pytest.raises(RuntimeError):
        train(config.resolve(None, tiny_overrides(image_folder, tmp_path, name="crashed")), callbacks=[Boom()])
    assert not (tmp_path / "runs" / "crashed").exists()


def test_pipeline_functions_take_at_most_six_parameters():
    """A helper that needs more takes the Job or a Stage: fifteen positional arguments derived from
    the config are a sign of a missing context object."""
    tree = ast.parse((ROOT / "graftnet" / "train" / "pipeline.py").read_text())
    wide = [f"{node.name}: {n}" for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for n in [len(node.args.args) + len(node.args.kwonlyargs) + len(node.args.posonlyargs)
                      - (node.args.args[:1] and node.args.args[0].arg == "self")]
            if n > 6]
    assert not wide, wide


def test_a_run_without_its_test_split_scored(image_folder, tmp_path):
    """A search's trial is chosen on validation alone: train(test=False) saves the model and its
    history but never scores the test split."""
    r = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, name="trial", **{"train.epochs": 2})),
              test=False)
    assert r.metrics == {} and len(r.history) == 2 and r.best_val is not None
    assert (r / "model.safetensors").is_file()
    assert not (r / "test_metrics.json").exists() and not (r / "test_predictions.csv").exists()
