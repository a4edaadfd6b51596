"""Prototype classifiers for class-incremental learning (continual/prototype.py), on synthetic features."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from graftnet.continual.prototype import GRID, NearestClassMean, RidgeClassifier

D, K = 16, 10
TASKS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


def clusters(n_per_class: int, seed: int, spread: float = 1.0, k: int = K, dim: int = D):
    """Gaussian clusters around fixed class centres (the same centres for every seed)."""
    centres = torch.randn(k, dim, generator=torch.Generator().manual_seed(1234)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


def rings(n: int, seed: int):
    """Three concentric rings in the plane (separable only by radius), plus a constant feature as
    pooled backbone features have (their mean is far from zero)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    r = (y + 1).float() + 0.15 * torch.randn(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin(), torch.ones(n)], 1), y


def by_task(x, y, order):
    for t in order:
        rows = torch.isin(y, torch.tensor(TASKS[t]))
        yield x[rows], y[rows]


def accuracy(logits, y):
    return float((logits.argmax(1) == y).double().mean())


@pytest.mark.parametrize("projection", [0, 64])
def test_incremental_ridge_equals_joint_fit(projection):
    x, y = clusters(40, seed=0, spread=2.0)
    joint = RidgeClassifier(D, projection=projection, seed=3)
    joint.update(x, y)
    joint.fit(lam=1.0)
    inc = RidgeClassifier(D, projection=projection, seed=3)
    for t, (xt, yt) in enumerate(by_task(x, y, range(5))):
        inc.update(xt, yt)
        inc.fit(lam=1.0)  # a fit after every task, as a continual run does
        assert inc.classes == sorted(c for task in TASKS[:t + 1] for c in task)
    assert inc.W.shape == joint.W.shape == (projection or D, K)
    torch.testing.assert_close(inc.W, joint.W, rtol=1e-10, atol=1e-12)
    test_x, _ = clusters(30, seed=1, spread=2.0)
    assert torch.equal(inc.logits(test_x).argmax(1), joint.logits(test_x).argmax(1))


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("projection", [0, 64])
def test_ridge_is_independent_of_task_order(projection, validation):
    x, y = clusters(30, seed=0, spread=2.5)
    val = clusters(10, seed=5, spread=2.5) if validation else (None, None)
    fitted = []
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 2, 1]):
        r = RidgeClassifier(D, projection=projection, seed=0)
        for xt, yt in by_task(x, y, order):
            r.update(xt, yt)
            r.fit(*val)
        fitted.append(r)
    a, b = fitted
    assert a.lam == pytest.approx(b.lam, rel=1e-12)
    torch.testing.assert_close(a.W, b.W, rtol=0, atol=1e-8)
    fixed = [r.fit(lam=0.5).W for r in fitted]
    torch.testing.assert_close(fixed[0], fixed[1], rtol=0, atol=1e-8)


def test_random_features_separate_what_a_linear_ridge_cannot():
    (x, y), (vx, vy), (tx, ty) = rings(1500, 0), rings(300, 1), rings(1000, 2)
    acc = {}
    for m in (0, 512):
        r = RidgeClassifier(3, projection=m, seed=0)
        r.update(x, y)
        acc[m] = accuracy(r.fit(vx, vy).logits(tx), ty)
    assert acc[512] > 0.9 and acc[0] < 0.6, acc


def test_nearest_class_mean_on_separated_clusters():
    x, y = clusters(50, seed=0)
    ncm = NearestClassMean()
    for xt, yt in by_task(x, y, range(5)):
        ncm.update(xt, yt)
    assert ncm.classes == list(range(K))
    tx, ty = clusters(50, seed=1)
    assert accuracy(ncm.logits(tx), ty) > 0.95
    # the prototypes are the class means, whatever the order the rows came in
    means = torch.stack([x[y == c].double().mean(0) for c in range(K)])
    torch.testing.assert_close(ncm.sums / ncm.counts.unsqueeze(1), means)


def noisy_problem(seed: int):
    """Few rows, many random features, noisy classes: small lams overfit, huge ones underfit."""
    x, y = clusters(12, seed=seed, spread=4.0, k=4)
    return x, y


def test_lam_selection_maximises_validation_accuracy():
    x, y = noisy_problem(0)
    vx, vy = noisy_problem(1)
    r = RidgeClassifier(D, projection=256, seed=0)
    r.update(x, y)
    r.fit(vx, vy)
    scale = float(torch.linalg.eigvalsh(r.G).clamp_min(0).mean())
    torch.testing.assert_close(r.grid, GRID * scale)
    assert r.lam in r.grid.tolist()
    chosen = r.lam
    accs = [accuracy(r.fit(lam=lam).logits(vx), vy) for lam in r.grid.tolist()]
    assert len(set(accs)) > 1, "the test problem should make lam matter"
    assert accs[r.grid.tolist().index(chosen)] == max(accs)
    # validation rows of classes the classifier has not seen (2, and 4..9 beyond its columns) do not count
    part = RidgeClassifier(D, projection=256, seed=0)
    part.update(x[y != 2], y[y != 2])
    scores = part.fit(vx[vy != 2], vy[vy != 2]).scores
    ux, uy = clusters(20, seed=2)
    part.fit(torch.cat([vx, ux[uy >= 4]]), torch.cat([vy, uy[uy >= 4]]))
    assert torch.equal(part.scores, scores)
    # a grid of one's own: the choice is one of its values
    own = RidgeClassifier(D, projection=256, seed=0, lambdas=[1e3, 1e1, 1e5])
    own.update(x, y)
    assert own.fit(vx, vy).lam in (1e1, 1e3, 1e5)


def test_lam_without_validation_minimises_generalised_cross_validation():
    x, y = noisy_problem(0)
    r = RidgeClassifier(D, projection=32, seed=0)
    r.update(x, y)
    r.fit()
    chosen = r.lam
    h, onehot = torch.relu(x.double() @ r.weight_in.double()), torch.eye(4, dtype=torch.float64)[y]
    gcv = []
    for lam in r.grid.tolist():  # GCV from the rows themselves: residuals and the hat matrix's trace
        hat = h @ torch.linalg.solve(h.T @ h + lam * torch.eye(32, dtype=torch.float64), h.T)
        gcv.append(float(((onehot - hat @ onehot) ** 2).sum() / (len(y) - hat.trace()) ** 2))
    assert len(set(round(v, 9) for v in gcv)) > 1
    assert r.grid.tolist().index(chosen) == min(range(len(gcv)), key=lambda i: (gcv[i], -i))
    torch.testing.assert_close(-r.scores, torch.tensor(gcv, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("make", [NearestClassMean, lambda: RidgeClassifier(D, projection=48, seed=7)])
def test_state_dict_round_trip_and_wrong_width(make, tmp_path):
    x, y = clusters(20, seed=0)
    c = make()
    c.update(x[y < 6], y[y < 6])
    if isinstance(c, RidgeClassifier):
        c.fit()
    save_file(c.state_dict(), tmp_path / "c.safetensors")
    back = make() if isinstance(c, NearestClassMean) else RidgeClassifier(D, projection=48, seed=99)
    back.load_state_dict(load_file(tmp_path / "c.safetensors"))
    assert torch.equal(back.logits(x), c.logits(x))
    assert back.classes == c.classes == list(range(6))
    for call in (lambda: c.update(x[:, :15], y), lambda: c.logits(x[:, :15])):
        with pytest.raises(ValueError, match=f"expected {D}, got 15"):
            call()


@pytest.mark.parametrize("make", [NearestClassMean, lambda: RidgeClassifier(D, projection=0)])
def test_new_labels_grow_the_classes_and_empty_updates_do_nothing(make):
    x, y = clusters(10, seed=0)
    c = make()
    c.update(x[y < 2].bfloat16(), y[y < 2])  # bf16 features, as a cache may hold them
    c.update(x[:0], y[:0])
    fit = (lambda: c.fit(lam=1.0)) if isinstance(c, RidgeClassifier) else (lambda: None)
    fit()
    before = c.logits(x)
    assert before.shape == (len(x), 2)
    c.update(x[:0], y[:0])
    fit()
    assert torch.equal(c.logits(x), before)
    c.update(x[y == 7], y[y == 7])
    fit()
    out = c.logits(x)
    assert out.shape == (len(x), 8) and c.classes == [0, 1, 7]
    assert torch.isinf(out[:, 2:7]).all() and (out[:, 2:7] < 0).all() and out[:, [0, 1, 7]].isfinite().all()


def test_ridge_asks_for_a_fit_after_update():
    x, y = clusters(5, seed=0)
    r = RidgeClassifier(D, projection=0)
    with pytest.raises(ValueError, match="nothing to fit"):
        r.fit()
    r.update(x, y)
    with pytest.raises(RuntimeError, match="fit"):
        r.logits(x)


def test_a_busy_machine_fits_on_one_thread_with_the_same_result(monkeypatch):
    """With the load average beyond this process's own threads, the eigendecomposition runs on one
    thread (oversubscribed LAPACK threads wait on each other: 7x slower measured) and the fit is the
    same; the thread count is restored after."""
    import graftnet.continual.prototype as proto
    x, y = clusters(30, seed=0)
    quiet = RidgeClassifier(D, projection=64, seed=0)
    quiet.update(x, y)
    quiet.fit()
    threads, seen = torch.get_num_threads(), []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(proto.torch.linalg, "eigh", lambda g: (seen.append(torch.get_num_threads()), eigh(g))[1])
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(proto.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
        busy = RidgeClassifier(D, projection=64, seed=0)
        busy.update(x, y)
        busy.fit()
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(proto.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        busy.fit()
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(threads)
    assert busy.lam == quiet.lam and torch.allclose(busy.W, quiet.W)
