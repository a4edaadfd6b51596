"""Ensembles: weights, the averaged-probability vote checked by hand, the saved ensemble as a run
for evaluate / predict, flip test-time augmentation, and a clear error for members with different
classes."""
import json

import pytest
import torch

from graftnet import config
from graftnet.cli import main
from graftnet.data.images import ImageSet, config_splits, load_images
from graftnet.data.sources import open_source
from graftnet.ensemble import build_ensemble, combine, ensemble_logits, fit_weights
from graftnet.errors import GraftError
from graftnet.evaluation import evaluate_run, predict
from graftnet.predictor import flip_tta, load_predictor
from graftnet.train.pipeline import train

from .conftest import make_folder, tiny_overrides


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny runs on one folder that differ in input size, seed and head."""
    tmp = tmp_path_factory.mktemp("ens")
    data = make_folder(tmp / "data", n=20)
    a = train(config.resolve(None, tiny_overrides(data, tmp, name="a")))
    b = train(config.resolve(None, tiny_overrides(data, tmp, name="b", **{
        "backbone.image_size": 48, "train.seed": 1, "head.hidden": [16], "train.epochs": 2})))
    return tmp, data, a, b


def test_fit_weights_prefers_the_better_member():
    labels = torch.arange(4).repeat(25)
    good = torch.nn.functional.one_hot(labels, 4).float() * 4       # right, confident
    noise = torch.randn(100, 4, generator=torch.Generator().manual_seed(0)) * 3
    w = fit_weights([noise, good], labels)
    assert w.sum().item() == pytest.approx(1, abs=1e-5) and (w >= 0).all()
    assert w[1] > 0.8
    nll = lambda w: -combine([noise, good], w)[torch.arange(100), labels].mean()  # noqa: E731
    assert nll(w) < nll(torch.tensor([0.5, 0.5]))


def test_ensemble_accuracy_matches_hand_computation(members, capsys):
    tmp, data, a, b = members
    ens = build_ensemble([a, b], str(data), out=tmp / "runs", name="ens")
    spec = json.loads((ens / "ensemble.json").read_text())
    weights = [m["weight"] for m in spec["members"]]
    assert weights == pytest.approx([0.5, 0.5]) and sum(weights) == pytest.approx(1)
    assert [m["image_size"] for m in spec["members"]] == [32, 48]
    # by hand: each member's probabilities on the test split, averaged, argmax against the labels
    cfg = config.resolve(a / "config.yaml")
    source = open_source(str(data))
    test = load_images(source, config_splits(source, cfg.data)["test"], 48)
    probs = [load_predictor(r).logits(test).softmax(1) for r in (a, b)]
    expected = ((probs[0] + probs[1]) / 2).argmax(1).eq(test.labels).sum().item() / len(test)
    metrics = json.loads((ens / "test_metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert metrics["n"] == len(test)
    # members score here as they did at the end of their own training (images are 24 px: no resize)
    for m, run in zip(spec["members"], (a, b)):
        own = json.loads((run / "test_metrics.json").read_text())["accuracy"]
        assert m["test_accuracy"] == pytest.approx(own, abs=1e-9)
    report = (ens / "report.html").read_text()   # its cards count members; it has no epochs of its own
    assert '<div class="label">members</div><div class="value">2</div>' in report
    assert '<div class="label">epochs</div>' not in report
    text = (ens / "config.yaml").read_text()  # says on top what applies, and still loads
    assert text.startswith("# An ensemble's config") and "ensemble.json lists the members" in text
    assert config.resolve(ens / "config.yaml").data.path == config.resolve(a / "config.yaml").data.path
    assert "ensemble: test accuracy" in capsys.readouterr().err
    # the function a distillation teacher uses gives the same log of averaged probabilities
    logits = ensemble_logits(ens, test)
    assert torch.allclose(logits.exp(), (probs[0] + probs[1]) / 2, atol=1e-5)
    assert torch.allclose(ensemble_logits([a, b], test), logits, atol=1e-6)


def test_saved_ensemble_works_with_evaluate_and_predict(members, capsys):
    tmp, data, a, b = members
    ens = build_ensemble([a, b], str(data), weighted=True, out=tmp / "runs", name="weighted")
    weights = [m["weight"] for m in json.loads((ens / "ensemble.json").read_text())["members"]]
    assert sum(weights) == pytest.approx(1, abs=1e-5) and min(weights) >= 0
    saved = json.loads((ens / "test_metrics.json").read_text())["accuracy"]
    assert evaluate_run(ens)["accuracy"] == pytest.approx(saved, abs=1e-9)
    assert (ens / "evaluations" / "data" / "report.html").is_file()

    image = data / "dog" / "003.png"
    [result] = predict(ens, image, top=3)
    pa, pb = (predict(r, image, top=3)[0] for r in (a, b))
    by_hand = {c: 0.0 for c in ("cat", "dog", "fox")}
    for w, r in zip(weights, (pa, pb)):
        for t in r["top"]:
            by_hand[t["class"]] += w * t["probability"]
    assert result["class"] == max(by_hand, key=by_hand.get)
    assert result["probability"] == pytest.approx(max(by_hand.values()), abs=1e-4)
    assert sum(t["probability"] for t in result["top"]) == pytest.approx(1, abs=1e-4)

    # through the CLI: ensemble, then predict on the saved ensemble
    assert main(["ensemble", str(a), str(b), "--data", str(data), "--out", str(tmp / "runs"),
                 "--name", "cli"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp / "runs" / "cli")
    assert main(["predict", out, str(image), "--json"]) == 0
    [cli] = json.loads(capsys.readouterr().out)
    equal = {c: 0.0 for c in by_hand}
    for r in (pa, pb):
        for t in r["top"]:
            equal[t["class"]] += t["probability"] / 2
    assert cli["class"] == max(equal, key=equal.get)
    assert cli["probability"] == pytest.approx(max(equal.values()), abs=1e-4)


def test_members_with_other_classes_are_refused(members, tmp_path, capsys):
    tmp, data, a, _ = members
    other_data = make_folder(tmp_path / "other", classes=("cat", "dog", "owl"), n=8)
    other = train(config.resolve(None, tiny_overrides(other_data, tmp_path, name="other",
                                                      **{"train.epochs": 1})))
    with pytest.raises(GraftError, match="share one class list"):
        build_ensemble([a, other], str(data), out=tmp_path / "runs")
    assert main(["ensemble", str(a), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "owl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing saved for a refused ensemble
    with pytest.raises(GraftError, match="at least two"):
        build_ensemble([a], str(data))


def test_an_ensemble_folder_teaches_a_distilled_student(members):
    """`graft distill --teacher ENSEMBLE`: the teacher's logits are the ensemble's, and its cache
    identity differs from each member's (other weights, other logits)."""
    from graftnet.compress.distill import DistillSettings, RunTeacher, distill
    from graftnet.train.pipeline import load_data
    tmp, data, a, b = members
    ens = build_ensemble([a, b], str(data), out=str(tmp / "runs"), name="teacher-ens")
    teacher = RunTeacher(ens)
    over = tiny_overrides(data, tmp, name="student-of-ens", **{"head.hidden": [16]})
    _, sets = load_data(config.resolve(None, over))
    torch.testing.assert_close(teacher(sets["test"]), ensemble_logits(ens, sets["test"]), atol=1e-5, rtol=1e-5)
    assert teacher.identity not in {RunTeacher(a).identity, RunTeacher(b).identity}
    student = distill(config.resolve(None, over), DistillSettings(str(ens), temperature=2.0, alpha=0.5))
    assert json.loads((student / "distill.json").read_text())["teacher_test_acc"] is not None
    # a teacher in the loop (augmented student) scores pixel batches: the same mixture of the members
    x = torch.stack(sets["test"].images[:4]).float()
    members_logits = [RunTeacher(r).pixel_logits(x) for r in (a, b)]
    torch.testing.assert_close(teacher.pixel_logits(x), combine(members_logits, teacher.predictor.weights))


def test_flip_tta_averages_each_image_and_its_mirror(members, capsys):
    tmp, data, a, b = members
    source = open_source(str(data))
    test = load_images(source, config_splits(source, config.resolve(a / "config.yaml").data)["test"], 48)
    mirrored = ImageSet([x.flip(-1) for x in test.images], test.labels, test.keys, test.classes)
    by_member = []
    for run in (a, b):
        plain = load_predictor(run)
        expected = (plain.logits(test) + plain.logits(mirrored)) / 2
        assert not torch.allclose(expected, plain.logits(test), atol=1e-3)  # the mirror changes scores
        assert torch.allclose(flip_tta(load_predictor(run)).logits(test), expected, atol=1e-5)
        by_member.append(expected)
    # an ensemble mirrors for every member, then averages probabilities with its weights
    ens = build_ensemble([a, b], str(data), out=tmp / "runs", name="tta")
    weights = torch.tensor([m["weight"] for m in json.loads((ens / "ensemble.json").read_text())["members"]])
    m = evaluate_run(ens, tta=True)
    expected_acc = combine(by_member, weights).argmax(1).eq(test.labels).float().mean().item()
    assert m["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    folder = ens / "evaluations" / "data-tta"   # beside, never over, the plain evaluation
    report = (folder / "report.html").read_text()
    assert "test-time augmentation" in report and "graftnet run tta: evaluation on data-tta" in report
    assert not (ens / "evaluations" / "data").exists()
    # saved with --tta: the ensemble scores mirrors when built and whenever it is loaded again
    assert main(["ensemble", str(a), str(b), "--data", str(data), "--tta", "--out", str(tmp / "runs"),
                 "--name", "tta-saved"]) == 0
    saved = tmp / "runs" / "tta-saved"
    assert json.loads((saved / "ensemble.json").read_text())["tta"] is True
    assert json.loads((saved / "test_metrics.json").read_text())["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert "each image and its mirror" in capsys.readouterr().err
    loaded = load_predictor(saved)
    assert loaded.info()["tta"] and all(m.views == [False, True] for m in loaded.members)
    assert torch.allclose(loaded.logits(test), combine(by_member, weights), atol=1e-5)
    assert evaluate_run(saved)["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    assert "test-time augmentation" in (saved / "evaluations" / "data" / "report.html").read_text()
    assert not load_predictor(ens).info()["tta"]  # the plain ensemble stays plain
    # from the command line; an ONNX model has no mirror pass and says so
    assert main(["predict", str(a), str(data / "dog" / "003.png"), "--json", "--tta"]) == 0
    [r] = json.loads(capsys.readouterr().out)
    assert r["probability"] == pytest.approx(predict(a, data / "dog" / "003.png", tta=True)[0]["probability"])
    assert main(["predict", str(tmp / "model.onnx"), str(data / "dog" / "003.png"), "--tta"]) == 2
    assert "--tta works with a run folder" in capsys.readouterr().err
