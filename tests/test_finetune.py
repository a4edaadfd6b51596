"""Fine-tuning: parameter groups, freezing, BatchNorm modes, discriminative rates, resume by name."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors import safe_open
from torch import nn

from graftnet import backbones, config
from graftnet.cli import main
from graftnet.backbones.fetched import MobileNetV2Features, VGG16Features
from graftnet.errors import ConfigError
from graftnet.heads import FeatureExtractor, GraftedModel, Pool, make_mlp
from graftnet.config import HeadConfig
from graftnet.model import load_model
from graftnet.train.finetune import (FineTuneMode, all_groups, backbone_groups, optimizer_groups,
                                     set_trainable, unfrozen_count)
from graftnet.train.loop import make_optimizer
from graftnet.train.pipeline import train

from .conftest import TINY, tiny_overrides
from .test_train import _graft, _position, kill_after_epoch


def _grafted(body: nn.Module, size: int = 32) -> GraftedModel:
    extractor = FeatureExtractor(body)
    pool = Pool("avg")
    dim = pool.out_features(extractor.channels(size))
    return GraftedModel(extractor, pool, make_mlp(dim, 3, HeadConfig(hidden=[8])))


def _bodies():
    yield TINY, lambda: backbones.create(backbones.get_spec(TINY), pretrained=False)[0]
    yield "efficientnet_lite0", backbones.get_spec("efficientnet_lite0").architecture
    yield "vgg16", VGG16Features
    yield "mobilenetv2", MobileNetV2Features


@pytest.mark.parametrize("name,make", list(_bodies()), ids=[n for n, _ in _bodies()])
def test_groups_cover_every_parameter_once_in_order(name, make):
    model = _grafted(make())
    groups = all_groups(model)
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert len(groups) >= 4, [g.name for g in groups]  # stem, stages..., head
    assert groups[-1].name == "head" and all(n.startswith(("mlp.", "pool.")) for n in groups[-1].params)
    order = [n for n, _ in model.extractor.model.named_parameters()]
    first = [order.index(g.params[0][len("extractor.model."):]) for g in groups[:-1]]
    assert first == sorted(first), "groups must run from the input to the output"


def _bn_modes(model, groups):
    """Per backbone group: the training flags of its BatchNorm layers."""
    modules = dict(model.named_modules())
    out = []
    for g in groups[:-1]:
        owners = {n.rsplit(".", 1)[0] for n in g.params}
        out.append({modules[o].training for o in owners
                    if isinstance(modules[o], nn.modules.batchnorm._BatchNorm)})
    return out


def test_top_n_freezes_the_rest_and_bn_modes():
    model = _grafted(backbones.create(backbones.get_spec(TINY), pretrained=False)[0])
    groups = all_groups(model)
    set_trainable(model, groups, 2)
    grads = [{model.get_parameter(n).requires_grad for n in g.params} for g in groups]
    n = len(groups)
    assert grads == [{False}] * (n - 3) + [{True}] * 3  # 2 backbone groups + head
    FineTuneMode(model, "frozen").train()
    modes = _bn_modes(model, groups)
    assert modes[:-2] == [{False}] * (n - 3) and modes[-2:] == [{True}, {True}]
    FineTuneMode(model, "train").train()
    assert all(m == {True} for m in _bn_modes(model, groups))
    FineTuneMode(model, "eval").train()
    assert all(m == {False} for m in _bn_modes(model, groups))
    assert model.mlp.training  # the head itself always trains
    FineTuneMode(model, "frozen").eval()
    assert not any(m.training for m in model.modules())


def test_discriminative_rates_and_unfreeze_schedules():
    model = _grafted(backbones.create(backbones.get_spec(TINY), pretrained=False)[0])
    groups = all_groups(model)
    opt = make_optimizer(optimizer_groups(model, groups, 1e-3, 0.5, 0.01), "adamw", 1e-3, 0.01)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[-1] == pytest.approx(1e-3)
    assert lrs == pytest.approx([1e-3 * 0.5 ** (len(groups) - 1 - i) for i in range(len(groups))])
    assert [g["name"] for g in opt.param_groups] == [g.name for g in groups]
    k = len(groups) - 1
    assert [unfrozen_count("gradual:2", e, k) for e in range(6)] == [1, 1, 2, 2, 3, 3]
    assert unfrozen_count("gradual:1", 50, k) == k
    assert unfrozen_count("top:2", 0, k) == 2 and unfrozen_count("all", 0, k) == k
    for bad in ("top", "top:0", "gradual:x", "some"):
        with pytest.raises(ConfigError, match="finetune.unfreeze"):
            config.resolve(None, {"finetune.unfreeze": bad})


def test_finetune_trains_only_unfrozen_groups(image_folder, tmp_path):
    """Stage 2 with top:1 moves the top backbone group and the head; lower groups keep the initial
    weights, and frozen BatchNorm statistics stay as they were."""
    cfg = config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.epochs": 1, "finetune.epochs": 2, "finetune.unfreeze": "top:1", "finetune.lr": 3e-3,
        "name": "ft"}))
    run = train(cfg)
    tuned, _ = load_model(run)
    torch.manual_seed(0)
    init = backbones.create(backbones.get_spec(TINY), pretrained=False)[0]
    groups = backbone_groups(tuned)
    init_state = init.state_dict()
    tuned_state = tuned.extractor.model.state_dict()
    strip = len("extractor.model.")
    top = {n[strip:] for n in groups[-1].params}
    for k, v in tuned_state.items():
        owner = k.rsplit(".", 1)[0]
        in_top = any(p.rsplit(".", 1)[0] == owner for p in top)
        if in_top and k in top:
            assert not torch.equal(v, init_state[k]), f"{k} should have trained"
        elif not in_top:
            assert torch.equal(v, init_state[k]), f"{k} is frozen and must not change"
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r.get("stage") for r in history] == [None, "fine-tuning", "fine-tuning"]  # marked on the curves


def _resume_like(killed, ref, env):
    """Resume `killed` in a new process; its final weights must be `ref`'s. Returns its model and
    both histories."""
    resumed = _graft("finetune", "--resume", str(killed), env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a, _ = load_model(ref)
    b, _ = load_model(killed)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k
    history = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, killed)]
    return b, *history


def test_sigkill_during_finetuning_then_resume_matches_uninterrupted(image_folder, tmp_path):
    """Killed mid-epoch in stage 2 (gradual unfreezing, cosine schedule, a weight average), `--resume`
    rebuilds the optimizer groups by name with their rates and moments, goes on with the same
    average, and ends where a run never stopped ends. The saved model is the average."""
    args = ["finetune", "--data", str(image_folder), "--backbone", TINY, "--no-pretrained",
            "--image-size", "32", "--epochs", "1", "--finetune-epochs", "4", "--unfreeze", "gradual:1",
            "--batch-size", "4", "--hidden", "16", "--dropout", "0.2", "--features", "multi",
            "--finetune-lr", "2e-3", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--precision", "fp32", "--ema", "0.8"]
    env = {**os.environ, "GRAFTNET_QUIET": "1"}
    assert main([*args, "--name", "ref"]) == 0  # the reference, in this process
    killed = tmp_path / "runs" / "killed"
    done = kill_after_epoch(_graft(*args, "--name", "killed", env=env), killed, 3)
    assert 3 <= done < 5, "the run was not killed during fine-tuning"
    with safe_open(str(killed / "checkpoint" / "last.safetensors"), "pt") as f:
        groups = json.loads(f.metadata()["graftnet"])["param_groups"]
        assert groups[-1]["name"] == "head" and len(groups) > 3
        assert any(k.startswith("optim/extractor.model.") for k in f.keys())  # moments by name
        assert any(k.startswith("callback/WeightEMA/extractor.model.") for k in f.keys())  # the average
    b, ha, hb = _resume_like(killed, tmp_path / "runs" / "ref", env)
    assert [r["lr"] for r in ha] == pytest.approx([r["lr"] for r in hb])
    assert [r["val_acc"] for r in ha] == pytest.approx([r["val_acc"] for r in hb])
    with safe_open(str(killed / "checkpoint" / "last.safetensors"), "pt") as f:
        trained = {k[len("model/"):]: f.get_tensor(k) for k in f.keys() if k.startswith("model/")}
        prefix = "callback/WeightEMA/"
        average = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    head = "mlp.0.weight"
    assert torch.allclose(b.state_dict()[head], average[head]) and not torch.allclose(b.state_dict()[head],
                                                                                      trained[head])


def test_sigkill_within_an_epoch_then_resume_matches_uninterrupted(image_folder, tmp_path):
    """With checkpoints within epochs (here after every batch), a run killed part-way through a
    fine-tuning epoch goes on from the batch after its last checkpoint: the same order, the same
    RandAugment draws and dropout masks, the epoch's train loss and accuracy summed over both
    processes. It ends where a run never stopped (and checkpointed at epoch ends only) ends."""
    args = ["finetune", "--data", str(image_folder), "--backbone", TINY, "--no-pretrained",
            "--image-size", "32", "--epochs", "1", "--finetune-epochs", "3", "--unfreeze", "top:2",
            "--batch-size", "2", "--hidden", "16", "--dropout", "0.3", "--features", "multi",
            "--finetune-lr", "2e-3", "--finetune-augment", "randaugment", "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32", "--ema", "0.8"]
    env = {**os.environ, "GRAFTNET_QUIET": "1"}
    assert main([*args, "--name", "ref", "--checkpoint-minutes", "0"]) == 0
    killed = tmp_path / "runs" / "killed"
    proc = _graft(*args, "--name", "killed", "--checkpoint-minutes", "1e-9", env=env)
    deadline = time.time() + 300
    while _position(killed) < (2, 2) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch, batch = _position(killed)
    assert epoch == 2 and 0 < batch < 15, f"not killed within the second fine-tuning epoch: {epoch}, {batch}"
    _, ha, hb = _resume_like(killed, tmp_path / "runs" / "ref", env)
    assert [r["epoch"] for r in hb] == [1, 2, 3, 4]
    for key in ("train_loss", "train_acc", "val_acc", "lr"):
        assert [r[key] for r in ha] == pytest.approx([r[key] for r in hb], rel=1e-5), key


def test_init_from_a_run_at_another_size_other_classes_and_a_mismatch(image_folder, tmp_path):
    """`--init RUN` starts from a finished run's weights: at another image size all of them (a rate of
    1e-12 changes nothing, so the result is the source model), with other classes the backbone only;
    a head of another shape is refused with the run folder and the tensor named."""
    from graftnet.errors import GraftError
    from .conftest import make_folder
    src = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        "train.epochs": 1, "finetune.epochs": 1, "finetune.lr": 3e-3, "name": "src"})))
    frozen = {"train.epochs": 0, "finetune.epochs": 1, "finetune.lr": 1e-12, "finetune.weight_decay": 0.0,
              "train.init": str(src)}
    run = train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
        **frozen, "backbone.image_size": 48, "name": "bigger"})))
    a, _ = load_model(src)
    b, spec = load_model(run)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-6), k
    assert spec.image_size == 48 and "+init:" in spec.weights_id  # another feature-cache key
    assert "weights from" in (run / "log.txt").read_text()
    assert "started from" in (run / "report.html").read_text() and str(src) in (run / "report.html").read_text()
    other = make_folder(tmp_path / "other", classes=("ant", "bee", "cow", "elk"), n=10)
    run = train(config.resolve(None, tiny_overrides(other, tmp_path, **{**frozen, "name": "other"})))
    c, _ = load_model(run)
    ca = {k: v for k, v in a.state_dict().items() if k.startswith("extractor.")}
    assert all(torch.allclose(v.float(), c.state_dict()[k].float(), atol=1e-6) for k, v in ca.items())
    assert c.mlp[-1].out_features == 4
    with pytest.raises(GraftError, match=r"(?s)src: its model cannot start this run.*mlp\..*\(32,"
                       r".*to build that run's model here, add: --hidden '32'$"):
        train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
            **frozen, "head.hidden": [16], "name": "mismatch"})))
    assert not (tmp_path / "runs" / "mismatch").exists()


def _weights(run):
    return load_model(run)[0].state_dict()


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_micro_batches_take_the_whole_batch_step(image_folder, tmp_path, monkeypatch, bn):
    """Batches of 8 in chunks of 3 (3 + 3 + 2, gradients accumulated): with BatchNorm on its running
    statistics (fine-tuning's default) the same weights and train loss as whole batches. With
    BatchNorm on batch statistics chunks change the step, so the default (here: a device that
    would chunk by 3) keeps batches whole there, and chunks them where that is exact."""
    import graftnet.train.pipeline as pipeline

    def run(name, micro):
        return train(config.resolve(None, tiny_overrides(image_folder, tmp_path, **{
            "train.epochs": 1, "finetune.epochs": 1, "finetune.unfreeze": "top:2", "finetune.bn": bn,
            "finetune.lr": 3e-3, "finetune.augment": "flip", "backbone.precision": "fp32",
            "train.micro_batch": micro, "name": name})))
    whole, chunked = _weights(run("whole", 8)), _weights(run("chunked", 3))
    monkeypatch.setattr(pipeline, "chunk_size", lambda device, size, requested: requested or 3)
    default = _weights(run("default", 0))
    same = lambda a, b: all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)  # noqa: E731
    if bn == "eval":
        assert same(whole, chunked) and same(whole, default)
        losses = [[json.loads(x)["train_loss"] for x in (tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines()]
                  for n in ("whole", "chunked")]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    else:
        assert not same(whole, chunked)  # each chunk normalised with its own statistics
        assert same(whole, default)


def test_chunk_size_by_device_and_input_size():
    from graftnet.features import chunk_size, chunks
    assert [chunk_size("cpu", s) for s in (32, 128, 160, 192, 224)] == [32, 32, 16, 8, 8]
    assert chunk_size("cuda", 224) == 0 and chunk_size("cpu", 224, 64) == 64 == chunk_size("cuda", 32, 64)
    x = torch.arange(10)
    assert [len(c) for c in chunks(x, 4)] == [4, 4, 2] and chunks(x, 0)[0] is x and chunks(x, 10)[0] is x
