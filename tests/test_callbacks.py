"""Learning-rate schedules, early stopping and the weight average, as callbacks on the one loop;
progress output."""
import json

import pytest
import torch

from graftnet import config
from graftnet.errors import ConfigError
from graftnet.train.callbacks import EarlyStopping, WeightEMA, lr_factor
from graftnet.train.loop import Callback, State, fit
from graftnet.train.pipeline import train

from .conftest import tiny_overrides


def test_lr_factor_shapes():
    assert [lr_factor("constant", s, 100, 0) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0, 100, 10) == pytest.approx(0.1)          # warmup starts low
    assert lr_factor("cosine", 9, 100, 10) == pytest.approx(1.0)          # and reaches the base
    assert lr_factor("cosine", 10, 100, 10) == pytest.approx(1.0)
    assert lr_factor("cosine", 55, 100, 10) == pytest.approx(0.5)         # half-way down
    assert lr_factor("cosine", 100, 100, 10) == pytest.approx(0.0)
    assert lr_factor("onecycle", 0, 100, 0) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 25, 100, 0) == pytest.approx(1.0)
    assert lr_factor("onecycle", 100, 100, 0) == pytest.approx(1e-4)


def test_cosine_schedule_in_a_run(image_folder, tmp_path):
    run = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.schedule": "cosine", "train.warmup_epochs": 1, "train.epochs": 4})))
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    base = 3e-3
    assert lrs[0] == pytest.approx(base, rel=1e-6)       # end of warmup
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3]
    assert lrs[3] < 0.1 * base


def test_early_stopping_stops_and_restores_best(tmp_path):
    module = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(module, tmp_path, patience=2)
    state = State()
    weights = {}
    for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.65, 0.9], start=1):
        with torch.no_grad():
            module.weight.fill_(epoch)
        weights[epoch] = module.weight.clone()
        state.epoch = epoch
        row = {"epoch": epoch, "val_acc": acc}
        state.history.append(row)
        stopper.after_epoch(state, row)
        if state.stop:
            break
    assert state.stop and state.epoch == 4    # best at 2, no better at 3 and 4
    stopper.after_fit(state)  # the loop's event at the end of a fit
    assert torch.equal(module.weight, weights[2])


def test_early_stopping_of_a_second_stage_ignores_the_first(tmp_path):
    """Fine-tuning's stopper judges its own epochs: a better stage-1 epoch (another module's
    weights) neither stops it at once nor gets restored into the fine-tuned model."""
    module = torch.nn.Linear(2, 2)
    stopper = EarlyStopping(module, tmp_path, patience=1, first_epoch=2, name="best-finetune")
    state = State(epoch=2, history=[{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.95}])
    for epoch, acc in ((3, 0.8), (4, 0.7)):
        with torch.no_grad():
            module.weight.fill_(epoch)
        state.epoch = epoch
        row = {"epoch": epoch, "val_acc": acc}
        state.history.append(row)
        stopper.after_epoch(state, row)
        assert state.stop == (epoch == 4)
    stopper.after_fit(state)  # the loop's event at the end of a fit
    assert (module.weight == 3).all() and (tmp_path / "checkpoint" / "best-finetune.safetensors").is_file()


def test_weight_average_is_validated_and_left_in_the_model_at_the_end():
    """The loop validates the average (w_k = d w_(k-1) + (1 - d) theta_k, BatchNorm statistics too)
    while training goes on from the trained weights; when the fit ends the average stays in the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ema = WeightEMA(model, 0.75)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    trained, seen, after = [], [], []

    class Spy(Callback):  # after the average's own callbacks: sees what the loop validates
        def after_step(self, state):
            trained.append({k: v.clone() for k, v in model.state_dict().items()})

        def before_eval(self, state):
            seen.append({k: v.clone() for k, v in model.state_dict().items()})

        def after_eval(self, state):
            after.append({k: v.clone() for k, v in model.state_dict().items()})

    def expected():
        w = {k: v.clone() for k, v in start.items()}
        for t in trained:
            w = {k: (0.75 * w[k] + 0.25 * t[k]) if v.is_floating_point() else t[k] for k, v in w.items()}
        return w

    fit(model, lambda: [(x, y)] * 3, 3, lambda: [(x, y)], opt, 2, State(), [ema, Spy()])
    assert len(trained) == 6 and len(seen) == 2
    want = expected()
    for k, v in seen[-1].items():  # validated: the average after 6 steps
        assert torch.allclose(v.float(), want[k].float(), atol=1e-6), k
    assert not torch.allclose(seen[-1]["0.weight"], trained[-1]["0.weight"])
    for k, v in after[-1].items():  # training state is back after each validation pass
        assert torch.equal(v, trained[-1][k]), k
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), want[k].float(), atol=1e-6), k
    with pytest.raises(ConfigError, match="finetune.ema"):
        config.resolve(None, {"finetune.ema": 1.0})


def test_bad_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="train.schedule"):
        config.resolve(None, {"train.schedule": "linear"})
    with pytest.raises(ConfigError, match="label_smoothing"):
        config.resolve(None, {"train.label_smoothing": 1.5})


def test_lr_range_test_finds_a_rate_between_too_small_and_divergent():
    from graftnet.train.lr_find import lr_range_test, suggest
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    lrs, losses = lr_range_test(head, x, y, "adam", 32, g, steps=150)
    assert lrs == sorted(lrs) and len(lrs) == len(losses) > 50
    best = suggest(lrs, losses)
    assert 1e-4 < best < 1.0
    assert min(losses) < losses[0]  # the loss did fall somewhere in the range


def test_lr_find_cli_writes_plot(image_folder, tmp_path, capsys):
    from graftnet.cli import main
    out = tmp_path / "lr.png"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"backbone: {{name: test_efficientnet, pretrained: false, image_size: 32, features: multi}}\n"
                   f"cache_dir: {tmp_path / 'cache'}\n")
    assert main(["lr-find", "--config", str(cfg), "--data", str(image_folder), "--out", str(out)]) == 0
    assert "suggested learning rate" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG" and out.with_suffix(".json").is_file()


def test_progress_without_a_terminal_prints_plain_lines(monkeypatch, capsys):
    """Under nohup or in a batch job stderr is a file: a Rich bar would stay silent for a whole
    epoch, so plain lines with counts and an ETA go out at the chosen interval instead."""
    from graftnet import progress
    monkeypatch.delenv("GRAFTNET_QUIET", raising=False)
    monkeypatch.setenv("GRAFTNET_PROGRESS_SECONDS", "0")
    with progress.bar(4, "epoch 3") as advance:
        for _ in range(4):
            advance(1, loss=0.5)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("epoch 3: 1/4 (25%)  loss 0.5000  elapsed 0:00  ETA ")
    assert [ln.split(":")[1].split()[0] for ln in lines] == ["1/4", "2/4", "3/4"]  # not the last
    monkeypatch.setenv("GRAFTNET_PROGRESS_SECONDS", "3600")
    with progress.bar(4, "epoch 4") as advance:
        advance(2)
    assert capsys.readouterr().err == ""
