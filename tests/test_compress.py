"""Pruning and distillation on the tiny backbone: sparsity and masks, real channel removal and a
faithful reload, the KD loss against a hand computation, a distilled run, the teacher-logit cache."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from graftnet import config
from graftnet.compress.distill import DistillSettings, RunTeacher, distill, kd_loss, teacher_logits
from graftnet.compress.prune import (PruneSettings, Run, auto_round_to, calibrate, channel_pruner, magnitude_prune, prunable,
                                     prune_run, recalibrate_bn, sparsity, tied_layers)
from graftnet.errors import ConfigError, GraftError
from graftnet.evaluation import evaluate_run
from graftnet.model import load_model
from graftnet.train.pipeline import train

from .conftest import make_folder, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained run shared by the tests (a few seconds)."""
    tmp = tmp_path_factory.mktemp("compress")
    data = make_folder(tmp / "data", n=14)
    # fp32: tests below compare chunked against whole-batch steps to 1e-5, which bf16 autocast (the
    # "auto" choice on a CPU with AVX512-BF16 or AMX) would not hold
    run = train(config.resolve(None, tiny_overrides(data, tmp, **{"train.epochs": 4,
                                                                   "backbone.precision": "fp32"})))
    return run, tmp


def test_unstructured_reaches_sparsity_and_masks_survive_finetune(trained):
    run, tmp = trained
    out = prune_run(run, PruneSettings("unstructured", 0.6, global_pruning=True, steps=2,
                                       finetune_epochs=1, lr=1e-2), out=str(tmp / "pruned"))
    model, _ = load_model(out)
    weights = [m.weight for m, _ in prunable(model)]
    zeros = sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.6 - 1e-3  # a large lr fine-tune would regrow pruned weights without MaskKeeper
    report = json.loads((out / "prune.json").read_text())
    assert report["after"]["sparsity"] == pytest.approx(zeros)
    assert report["before"]["sparsity"] < 0.01
    assert [s["step"] for s in report["steps"]] == [1, 2] and report["steps"][0]["sparsity"] < 0.45
    assert report["after"]["deflate_bytes"] < report["before"]["deflate_bytes"]
    assert report["after"]["params"] == report["before"]["params"]  # dense: same shapes
    assert len(json.loads((out / "metrics.jsonl").read_text().splitlines()[0])) and (out / "report.html").is_file()


def test_magnitude_prune_per_layer_and_growing():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4))
    magnitude_prune(net, 0.3, global_pruning=False)
    assert all(abs((m.weight == 0).float().mean().item() - 0.3) < 0.02 for m, _ in prunable(net))
    small = net[0].weight.abs()[net[0].weight != 0].min()
    masks = magnitude_prune(net, 0.5, global_pruning=False)  # a second step extends the first's zeros
    assert sparsity(net) == pytest.approx(0.5, abs=0.02)
    assert all(((w == 0) == (m == 0)).all() for w, m in masks.items())
    assert net[0].weight.abs().max() > small


def test_structured_removes_channels_and_reloads_exactly(trained):
    run, tmp = trained
    before, _ = load_model(run)
    out = prune_run(run, PruneSettings("structured", 0.5, steps=2, finetune_epochs=1, distill=0.5),
                    out=str(tmp / "pruned"), name="structured")
    model, spec = load_model(out)
    n_before = sum(p.numel() for p in before.parameters())
    n_after = sum(p.numel() for p in model.parameters())
    assert n_after < 0.6 * n_before
    assert spec.pruned and model.mlp[-1].out_features == 3  # classes kept
    report = json.loads((out / "prune.json").read_text())
    assert report["after"]["params"] == n_after and report["after"]["macs"] < report["before"]["macs"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["step 1: 25% channels pruned", "step 2: 50% channels pruned"]
    assert "0.5·T²·KL + 0.5·CE" in (out / "report.html").read_text()  # the recovery's loss is explained
    # the saved spec rebuilds the pruned network: same logits as the network that was saved
    x = torch.randn(4, 3, spec.image_size, spec.image_size)
    again, _ = load_model(out)
    torch.testing.assert_close(model(x), again(x))
    m = evaluate_run(out)
    assert m["accuracy"] == pytest.approx(report["after"]["test_acc"], abs=1e-6)
    # a model.json cannot make the loader set anything but size attributes
    spec = json.loads((out / "model.json").read_text())
    spec["pruned"][next(iter(spec["pruned"]))]["attrs"] = {"forward": 1}
    (out / "model.json").write_text(json.dumps(spec))
    with pytest.raises(GraftError, match="not a size attribute"):
        load_model(out)


def test_recalibrate_bn_measures_the_data_and_leaves_the_rest():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5))
    bn = net[1]
    bn.running_mean.fill_(7.0)  # stale statistics, as after a pruning step
    bn.running_var.fill_(0.01)
    weight = net[0].weight.clone()
    xs = [torch.randn(8, 3, 5, 5) * 3 + 1 for _ in range(4)]
    net.train()
    seen = recalibrate_bn(net, ((x, None) for x in xs), limit=24)  # stops after 3 batches
    assert seen == 24 and net.training and bn.momentum == 0.1  # mode and momentum restored
    with torch.no_grad():  # an equal-weight average over the batches seen, not a moving one
        ys = [net[0](x) for x in xs[:3]]
    torch.testing.assert_close(bn.running_mean, torch.stack([y.mean((0, 2, 3)) for y in ys]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([y.var((0, 2, 3)) for y in ys]).mean(0))
    assert torch.equal(net[0].weight, weight)  # no gradient step, only statistics


def test_calibrate_keeps_new_statistics_only_when_validation_does_not_drop(trained):
    run = Run(trained[0])
    norms = [m for m in run.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    original = [m.running_mean.clone() for m in norms]
    scores = iter([0.8, 0.5])  # before, after: worse -> the old statistics come back
    assert calibrate(run, run.model, 64, 0, lambda: next(scores)) == (0.8, False)
    assert all(torch.equal(m.running_mean, o) for m, o in zip(norms, original))
    scores = iter([0.5, 0.6])
    assert calibrate(run, run.model, 64, 0, lambda: next(scores)) == (0.6, True)
    assert any(not torch.equal(m.running_mean, o) for m, o in zip(norms, original))


def test_structured_taylor_recovery_with_fixed_statistics(trained):
    """bn="eval": recovery trains the weights, not the BatchNorm statistics; Taylor ranking runs."""
    run, tmp = trained
    out = prune_run(run, PruneSettings("structured", 0.3, finetune_epochs=1, calibrate=0, lr=1e-2,
                                       importance="taylor", importance_images=16),
                    out=str(tmp / "pruned"), name="taylor")
    step = json.loads((out / "prune.json").read_text())["steps"][0]
    assert "test accuracy before pruning" in (out / "report.html").read_text()
    assert step["recalibrated_kept"] is False and step["macs"] < json.loads(
        (out / "prune.json").read_text())["before"]["macs"]
    model, _ = load_model(out)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)  # no batch ever updated them
    for bad in ({"bn": "batch"}, {"importance": "random"}):
        with pytest.raises(ConfigError, match="bn|importance"):
            prune_run(run, PruneSettings(**bad))


@pytest.mark.parametrize("kwargs, match", [({"amount": 0}, "amount"), ({"amount": 1.5}, "amount"),
                                           ({"method": "random"}, "method"), ({"steps": 0}, "steps"),
                                           ({"channels": "outer"}, "channels")])
def test_prune_bad_settings(trained, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prune_run(trained[0], PruneSettings(**kwargs))


class _Residual(torch.nn.Module):
    """A stem and one inverted residual block (expand, depthwise, project, add), then a head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.expand = torch.nn.Conv2d(16, 32, 1)
        self.dw = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = torch.nn.Conv2d(32, 16, 1)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(16, 3))

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(torch.relu(self.dw(torch.relu(self.expand(x)))))
        return self.mlp(x.mean((2, 3)))


@pytest.mark.parametrize("channels, stream, inner", [("all", 8, 16), ("inner", 16, 16)])
def test_inner_channels_keep_the_residual_stream(channels, stream, inner):
    torch.manual_seed(0)
    net = _Residual()
    assert tied_layers(net, torch.zeros(1, 3, 8, 8)) in ([net.stem], [net.project])  # stem + project add up
    channel_pruner(net, 8, PruneSettings(amount=0.5, importance="magnitude", channels=channels)).step()
    assert (net.stem.out_channels, net.project.out_channels, net.mlp[0].in_features) == (stream,) * 3
    assert (net.expand.out_channels, net.dw.out_channels, net.project.in_channels) == (inner,) * 3
    assert net.mlp[0].out_features == 3 and net(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


def test_structured_pruning_keeps_channel_counts_the_kernels_run():
    """Without --round-to, channel counts stay multiples of 8 here (the narrowest pruned layer is 16
    wide): ONNX Runtime's kernels run 8 or 16 channels at once, and an unrounded prune of Lite0 made
    it slower. --round-to 1 keeps any count."""
    for round_to, kept_ok in ((None, lambda c: c % 8 == 0), (1, lambda c: c % 8 != 0)):
        torch.manual_seed(0)
        net = _Residual()
        channel_pruner(net, 8, PruneSettings(amount=0.3, importance="magnitude", channels="inner",
                                             round_to=round_to)).step()
        assert net.expand.out_channels < 32 and kept_ok(net.expand.out_channels)
    assert auto_round_to([torch.nn.Conv2d(3, 64, 1), torch.nn.Linear(4, 32)]) == 16
    assert auto_round_to([torch.nn.Conv2d(3, 64, 1), torch.nn.Conv2d(3, 16, 1)]) == 8
    assert auto_round_to([torch.nn.Conv2d(3, 8, 1)]) == 1


def test_prune_missing_run(tmp_path):
    with pytest.raises(GraftError, match="not a graftnet run"):
        prune_run(tmp_path / "nope", PruneSettings())


def test_prune_recovery_learns_from_transfer_images_labeled_by_the_unpruned_model(trained, tmp_path):
    run, tmp = trained
    extra = make_folder(tmp_path / "extra", n=6, seed=5)  # another folder: all 18 images join
    settings = dict(method="structured", amount=0.3, finetune_epochs=1, lr=5e-3, calibrate=0,
                    importance_images=16, distill=0.7)
    plain = prune_run(run, PruneSettings(**settings), out=str(tmp_path), name="plain")
    more = prune_run(run, PruneSettings(**settings, transfer=str(extra), transfer_max=10), out=str(tmp_path),
                     name="transfer")
    report = json.loads((more / "prune.json").read_text())
    assert report["transfer_images"] == 10 and report["settings"]["transfer_max"] == 10
    assert "10 unlabeled" in (more / "report.html").read_text()
    assert json.loads((plain / "prune.json").read_text())["transfer_images"] == 0
    a, _ = load_model(plain)
    b, _ = load_model(more)
    assert not torch.allclose(a.mlp[-1].weight, b.mlp[-1].weight)  # the extra images were trained on
    with pytest.raises(ConfigError, match="distillation"):
        prune_run(run, PruneSettings(transfer=str(extra)))


@pytest.mark.parametrize("transfer", [False, True])
def test_prune_recovery_in_chunks_takes_the_whole_batch_step(trained, tmp_path, monkeypatch, transfer):
    """Recovery with distillation, batches of 8 in chunks of 3: each chunk's teacher logits travel
    with it, so the pruned model and its losses are those of whole batches. The default chunks
    (here: a device that would chunk by 3) except where the loss is a mean over the labeled
    images only (transfer images among them): there batches stay whole."""
    import shutil

    import yaml

    import graftnet.compress.source as source
    run, _ = trained
    extra = make_folder(tmp_path / "extra", n=4, seed=5)
    settings = dict(method="structured", amount=0.3, finetune_epochs=1, lr=5e-3, calibrate=0,
                    importance_images=16, distill=0.7, **({"transfer": str(extra)} if transfer else {}))
    chunks_used = []
    fit = source.fit
    monkeypatch.setattr(source, "fit", lambda *a, **k: chunks_used.append(k["micro_batch"]) or fit(*a, **k))
    monkeypatch.setattr(source, "chunk_size", lambda device, size, requested: requested or 3)

    def pruned(micro):
        copy = tmp_path / f"source-{micro}"
        shutil.copytree(run, copy)
        cfg = yaml.safe_load((copy / "config.yaml").read_text())
        cfg["train"]["micro_batch"] = micro
        (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
        out = prune_run(copy, PruneSettings(**settings), out=str(tmp_path), name=f"pruned-{micro}")
        history = [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        return load_model(out)[0].state_dict(), history
    (whole, whole_loss), (chunked, chunked_loss), (default, _) = pruned(8), pruned(3), pruned(0)
    assert chunks_used == [8, 3, 0 if transfer else 3]
    same = lambda a, b: all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)  # noqa: E731
    assert same(whole, default)
    if transfer:
        assert not same(whole, chunked)  # each chunk's hard term averaged over its own labeled images
    else:
        assert same(whole, chunked) and chunked_loss == pytest.approx(whole_loss, rel=1e-5)


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, point: str):
    """Make prune_run die at `point`, as a SIGKILL would, leaving only what it had checkpointed:
    "pruned" in step 2 before its recovery, "recovering" after step 2's first recovery epoch,
    "complete" after step 1 (inside step 2's first BatchNorm calibration)."""
    import graftnet.compress.prune as prune_mod
    from graftnet.train.checkpoint import Checkpointer
    calls = {"n": 0}

    def nth(original, n):
        def wrapper(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise _Killed(point)
            return original(*a, **k)
        return wrapper
    if point == "pruned":
        monkeypatch.setattr(prune_mod, "finetune", nth(prune_mod.finetune, 2))
    elif point == "complete":
        monkeypatch.setattr(prune_mod, "calibrate", nth(prune_mod.calibrate, 3))
    else:
        original = Checkpointer.after_epoch

        def after_epoch(self, state, row):
            original(self, state, row)
            if state.epoch == 3:
                raise _Killed(point)
        monkeypatch.setattr(Checkpointer, "after_epoch", after_epoch)


@pytest.mark.parametrize("method, point", [("structured", "pruned"), ("structured", "recovering"),
                                           ("structured", "complete"), ("unstructured", "recovering")])
def test_killed_prune_resumes_and_ends_where_an_uninterrupted_one_ends(trained, monkeypatch, method, point):
    """Two steps of two recovery epochs each, killed at each kind of checkpoint: `--resume` replays
    the removed channels on the source network, reloads weights, RNG and (mid-recovery) optimizer
    moments, and finishes with the weights, history and step records of a run never stopped."""
    run, tmp = trained
    settings = dict(method=method, amount=0.4, steps=2, finetune_epochs=2, lr=5e-3, calibrate=16,
                    importance_images=16)
    ref = prune_run(run, PruneSettings(**settings), out=str(tmp / "resume"), name=f"ref-{method}-{point}")
    with monkeypatch.context() as m:
        _kill_at(m, point)
        with pytest.raises(_Killed):
            prune_run(run, PruneSettings(**settings), out=str(tmp / "resume"), name=f"killed-{method}-{point}")
    killed = tmp / "resume" / f"killed-{method}-{point}"
    assert not (killed / "model.safetensors").exists() and (killed / "checkpoint" / "last.safetensors").is_file()
    assert prune_run(None, None, resume=killed) == killed
    a, _ = load_model(ref)
    b, _ = load_model(killed)
    assert [v.shape for v in a.state_dict().values()] == [v.shape for v in b.state_dict().values()]
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(va.float(), vb.float(), atol=1e-5), k
    history = [[json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (ref, killed)]
    assert [r["epoch"] for r in history[1]] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in history[0]] == pytest.approx([r["train_loss"] for r in history[1]])
    steps = [json.loads((r / "prune.json").read_text())["steps"] for r in (ref, killed)]
    assert steps[0] == steps[1]
    with pytest.raises(GraftError, match="finished already"):
        prune_run(None, None, resume=killed)


def test_prune_resume_clear_errors(trained, tmp_path):
    with pytest.raises(GraftError, match="nothing to resume"):
        prune_run(None, None, resume=trained[0])  # a training run's checkpoint is not a pruning one
    with pytest.raises(GraftError, match="nothing to resume"):
        prune_run(None, None, resume=tmp_path)


def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    y = torch.tensor([1, 2])
    T, a = 2.0, 0.6
    kl = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        ps = [math.exp(v / T) / sum(math.exp(u / T) for u in si) for v in si]
        pt = [math.exp(v / T) / sum(math.exp(u / T) for u in ti) for v in ti]
        kl += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = sum(-math.log(math.exp(si[yi]) / sum(math.exp(u) for u in si)) for si, yi in zip(s.tolist(), y.tolist()))
    expected = a * T * T * kl / 2 + (1 - a) * ce / 2
    assert kd_loss(s, t, y, T, a).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(s, t, y, T, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item())
    assert kd_loss(s, s, y, T, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distill_run_evaluates_and_caches_teacher_logits(trained):
    run, tmp = trained
    data = config.resolve(run / "config.yaml").data.path
    over = tiny_overrides(data, tmp, **{"name": "student", "head.hidden": [16]})
    student = distill(config.resolve(None, over), DistillSettings(str(run), temperature=3.0, alpha=0.8))
    assert (student / "distill.yaml").is_file() and (student / "report.html").is_file()
    info = json.loads((student / "distill.json").read_text())
    assert info["alpha"] == 0.8 and info["teacher_test_acc"] is not None
    m = evaluate_run(student)
    assert m["accuracy"] == pytest.approx(info["student_test_acc"], abs=1e-6)
    # the second use of the same teacher on the same images reads its logits from the cache
    teacher = RunTeacher(run)
    cfg = config.resolve(None, over)
    from graftnet.train.pipeline import load_data
    source, sets = load_data(cfg)
    cached, hit = teacher_logits(teacher, sets["train"], source.fingerprint, tmp / "cache")
    assert hit
    torch.testing.assert_close(cached, teacher(sets["train"]), atol=1e-4, rtol=1e-4)


def test_kd_loss_unlabeled_rows_count_in_the_soft_term_only():
    s, t = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    y = torch.tensor([2, -1, 0, -1])
    soft = kd_loss(s, t, torch.full((4,), -1), 2.0, 1.0)
    assert kd_loss(s, t, torch.full((4,), -1), 2.0, 0.5).item() == pytest.approx(0.5 * soft.item())
    hard = F.cross_entropy(s[[0, 2]], y[[0, 2]])
    assert kd_loss(s, t, y, 2.0, 0.3).item() == pytest.approx(0.3 * soft.item() + 0.7 * hard.item(), rel=1e-5)


def test_distill_transfer_set_leaves_out_the_runs_own_images(trained, tmp_path):
    run, tmp = trained
    data = make_folder(tmp_path / "data", n=14, seed=3)
    over = tiny_overrides(data, tmp_path, **{"data.max_per_class": 6})
    student = distill(config.resolve(None, over), DistillSettings(str(run), alpha=0.8, transfer=str(data)))
    info = json.loads((student / "distill.json").read_text())
    assert info["labeled_images"] < 18 and info["transfer_images"] == 3 * 14 - 3 * 6  # not val/test either
    assert "24 unlabeled" in (student / "report.html").read_text()
    flat = tmp_path / "flat"  # loose images, no class folders: the teacher labels them
    flat.mkdir()
    for i, p in enumerate(sorted((data / "cat").iterdir())[:5]):
        (flat / f"{i}.png").write_bytes(p.read_bytes())
    student = distill(config.resolve(None, over), DistillSettings(str(run), transfer=str(flat), transfer_max=4))
    assert json.loads((student / "distill.json").read_text())["transfer_images"] == 4
    with pytest.raises(ConfigError, match="transfer"):
        distill(config.resolve(None, over), DistillSettings(str(run), alpha=0.0, transfer=str(flat)))


def test_distill_clear_errors(trained, tmp_path):
    run, tmp = trained
    over = tiny_overrides(config.resolve(run / "config.yaml").data.path, tmp_path)
    with pytest.raises(GraftError, match="teacher run folder not found"):
        distill(config.resolve(None, over), DistillSettings(str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="alpha"):
        distill(config.resolve(None, over), DistillSettings(str(run), alpha=1.5))
    with pytest.raises(ConfigError, match="cached views"):
        distill(config.resolve(None, {**over, "train.augment": "flip", "train.cache_views": 2}),
                DistillSettings(str(run)))
    with pytest.raises(ConfigError, match="transfer set works with the cached path"):
        distill(config.resolve(None, {**over, "train.augment": "flip"}),
                DistillSettings(str(run), transfer=str(tmp_path)))
    with pytest.raises(GraftError, match="not a distillation run"):
        distill(None, None, resume=run)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_teacher_in_loop_sees_the_students_pixels_and_mixes_the_losses():
    """The callback undoes the student's normalisation exactly and adds alpha*T²*KL to (1-alpha)*loss."""
    from graftnet.compress.teach import TeacherInLoop
    from graftnet.data.images import to_batch
    from graftnet.train.loop import State
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8, generator=gen) for _ in range(4)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = to_batch(images, 8, mean, std)
    seen, target = {}, torch.randn(4, 3, generator=gen)

    class Fake:
        def pixel_logits(self, pixels):
            seen["pixels"] = pixels
            return target
    student = torch.randn(4, 3, generator=gen)
    hard = torch.tensor(1.7)
    out = TeacherInLoop(Fake(), mean, std, 2.0, 0.25).after_loss(State(batch=(x, None, student)), hard)
    torch.testing.assert_close(seen["pixels"], torch.stack(images).float(), atol=1e-3, rtol=0)
    soft = kd_loss(student, target, torch.full((4,), -1), 2.0, 1.0)
    assert out.item() == pytest.approx(0.25 * soft.item() + 0.75 * 1.7, rel=1e-5)


def test_pixel_logits_match_the_predictor_on_uint8_images(trained):
    from graftnet.predictor import RunPredictor
    predictor = RunPredictor.load(trained[0])
    gen = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=gen) for _ in range(3)]
    torch.testing.assert_close(predictor.pixel_logits(torch.stack(images).float()), predictor(images))


def test_distill_with_augmentation_puts_the_teacher_in_the_loop_and_resumes(trained, monkeypatch):
    """An augmented student cannot use cached teacher logits: the teacher scores every batch. A
    killed run resumes (its settings come from distill.yaml) and ends where one never stopped ends."""
    from graftnet.train.checkpoint import Checkpointer
    run, tmp = trained
    data = config.resolve(run / "config.yaml").data.path
    over = tiny_overrides(data, tmp, **{"train.augment": "flip", "train.epochs": 3, "head.hidden": [16]})
    settings = DistillSettings(str(run), temperature=2.0, alpha=0.6)
    ref = distill(config.resolve(None, {**over, "name": "loop-ref"}), settings)
    info = json.loads((ref / "distill.json").read_text())
    assert info["mode"] == "teacher in the loop" and info["teacher_test_acc"] is not None
    assert info["student_test_acc"] == pytest.approx(evaluate_run(ref)["accuracy"], abs=1e-6)
    assert "teacher test accuracy" in (ref / "report.html").read_text()
    baseline = distill(config.resolve(None, {**over, "name": "loop-none"}), DistillSettings(alpha=0.0))
    a, _ = load_model(ref)
    b, _ = load_model(baseline)
    assert not torch.allclose(a.mlp[-1].weight, b.mlp[-1].weight)  # the teacher changed the training
    original = Checkpointer.after_epoch

    def after_epoch(self, state, row):
        original(self, state, row)
        if state.epoch == 2:
            raise _Killed("after epoch 2")
    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "after_epoch", after_epoch)
        with pytest.raises(_Killed):
            distill(config.resolve(None, {**over, "name": "loop-killed"}), settings)
    killed = tmp / "runs" / "loop-killed"
    assert (killed / "distill.yaml").is_file() and not (killed / "distill.json").exists()
    assert distill(None, None, resume=killed) == killed
    c, _ = load_model(killed)
    for (k, va), vc in zip(a.state_dict().items(), c.state_dict().values()):
        assert torch.allclose(va, vc, atol=1e-5), k
    with pytest.raises(GraftError, match="finished already"):
        distill(None, None, resume=killed)


def test_cli_errors(tmp_path, capsys):
    from graftnet.cli import main
    assert main(["distill", "--data", str(tmp_path)]) == 2
    assert "needs --teacher" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nope"), "--amount", "0.5"]) == 2
    assert "not a graftnet run" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "nope"), "--amount", "2"]) == 2
    assert "amount" in capsys.readouterr().err
    assert main(["prune"]) == 2
    assert "give the RUN folder" in capsys.readouterr().err
    assert main(["prune", str(tmp_path), "--resume", str(tmp_path)]) == 2
    assert "give no RUN" in capsys.readouterr().err
    assert main(["prune", "--resume", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
