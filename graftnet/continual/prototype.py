"""Class-incremental classifiers on a frozen backbone's cached features: no exemplars, no gradients.

- `NearestClassMean` (SimpleCIL, Zhou et al. 2023): one prototype per class, the mean of its
  features; a row scores the cosine similarity to each prototype.
- `RidgeClassifier` (RanPAC, McDonnell et al. 2023): features pass through a fixed random matrix
  (N(0, 1), D x M) and a ReLU, then a closed-form ridge regression onto one-hot labels,
  W = (G + lam I)^-1 C with G = sum h h^T and C = sum h y^T.

Both keep only sums over the rows seen so far, and a class arriving later adds a column. With a
frozen backbone the features of a row never change, so these sums are all that any later task
needs: the ridge fitted after each task equals, up to rounding, the ridge fitted on all tasks' rows
at once, whatever their order, and nothing is forgotten except what the features cannot separate.
Sums are float64: float32 sums over tens of thousands of rows lose the equality to the joint fit.

Choosing lam, `fit()` tries a log-spaced grid at the cost of one eigendecomposition G = Q E Q^T
(W(lam) = Q (E + lam)^-1 Q^T C for every lam); it keeps the lam of best accuracy on validation
rows of the seen classes, or, without such rows, of least generalised cross-validation error
(Golub, Heath & Wahba 1979): GCV(lam) = RSS(lam) / (N - df(lam))^2, df = sum e / (e + lam), the
rotation-invariant form of leave-one-out error, computed from G, C and N alone, so it needs no
stored rows and depends on the data seen, not on the order it came in. Ties go to the larger lam,
the smoother of equally good fits. The default grid is 10^-8..10^6 times G's mean eigenvalue
(tr G / M): features scaled by a scale G by a^2, so a grid relative to G tries the same fits
whatever the features' norm or the number of rows. A grid given as `lambdas` is taken as it is.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import Tensor

CHUNK = 4096  # rows per block: bounds the random features held at once (4096 x M float64; 256 MiB at M=8192)
# Default projection M, measured on 2 CPU cores: 50,000 rows of 1,280 features, 10 classes in 5 tasks,
# each task an update then a fit choosing lam by GCV, then logits of all rows; seconds in total
# (update + 5 fits + logits). The sums G grow as N M^2 and each fit's eigh as M^3:
#   M=0: 3.5 (2.1 + 1.2 + 0.2)    M=2048: 16.5 (8.2 + 4.9 + 3.5)    M=4096: 80 (25 + 48 + 7)
#   M=8192: ~600 (85 + 500 + 14, from 2,500 rows and one fit of 100 s)
# A fit choosing lam on 5,000 validation rows instead of GCV: 0.8 s at M=0, 2.6 s at 2048, 13 s at 4096.
# On Split CIFAR-10 (frozen Lite0, 1,752 multi-depth features; bench/continual.py) the final accuracy
# was 80.3% at 2048, 80.9% at 3072 and 81.5% at 4096, against 81.6% for a jointly trained linear
# head: 3072 is the smallest within a point of it whose whole run stays within a minute.
PROJECTION = 3072
GRID = 10.0 ** torch.arange(-8, 7, dtype=torch.float64)  # times mean eigenvalue of G (tr G / M)


def _eigh(g: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh on one thread when other work already holds the cores. LAPACK's symmetric
    eigensolver synchronises its threads thousands of times (the tridiagonal reduction is matrix-vector
    work), and with the cores oversubscribed each wait can cost a time slice. Measured on 2 cores, M=3072,
    float64: quiet, 3.1 s on 2 threads and 7.0 s on one; beside another process computing on 2 threads
    (load average 3.8), 50 s on 2 threads and 7.5 s on one. This process's own threads count in the
    load average (up to one per core), so only load beyond that counts as others'."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    if threads == 1 or not hasattr(os, "getloadavg") or os.getloadavg()[0] <= cores + 0.5:
        return torch.linalg.eigh(g)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(g)
    finally:
        torch.set_num_threads(threads)


def _rows(x: Tensor, y: Tensor | None, dim: int | None) -> None:
    """Check the shapes and types of (x, y) against the feature width `dim` (None: not known yet)."""
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"features must be a float N x D tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"features have the wrong width: expected {dim}, got {x.shape[1]}")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or y.is_floating_point()
                          or (len(y) and int(y.min()) < 0)):
        raise ValueError(f"labels must be {len(x)} class ids >= 0 (int64), got {y.dtype} of shape {tuple(y.shape)}")


def _grow(t: Tensor, k: int, dim: int) -> Tensor:
    """`t` with zeros appended along `dim` up to size k (classes seen for the first time)."""
    if t.shape[dim] >= k:
        return t
    shape = list(t.shape)
    shape[dim] = k - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


class NearestClassMean:
    """Cosine similarity to each class's mean feature; classes never seen score -inf."""

    def __init__(self):
        self.dim: int | None = None
        self.sums = torch.zeros(0, 0, dtype=torch.float64)  # K x D
        self.counts = torch.zeros(0, dtype=torch.int64)     # K

    @property
    def classes(self) -> list[int]:
        return torch.nonzero(self.counts).flatten().tolist()

    def update(self, x: Tensor, y: Tensor) -> None:
        _rows(x, y, self.dim)
        if not len(y):
            return
        y, self.dim = y.long(), x.shape[1]
        k = max(int(y.max()) + 1, len(self.counts))
        self.sums = _grow(_grow(self.sums, self.dim, 1), k, 0)
        self.counts = _grow(self.counts, k, 0) + torch.bincount(y, minlength=k)
        for xs, ys in zip(x.split(CHUNK), y.split(CHUNK)):
            self.sums.index_add_(0, ys, xs.double())

    def logits(self, x: Tensor) -> Tensor:
        _rows(x, None, self.dim)
        means = torch.nn.functional.normalize(self.sums / self.counts.clamp_min(1).unsqueeze(1), dim=1)
        out = torch.nn.functional.normalize(x.double(), dim=1) @ means.T if len(self.counts) else x.new_zeros(len(x), 0)
        return out.masked_fill(self.counts == 0, float("-inf")).float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        self.sums, self.counts = d["sums"].double().clone(), d["counts"].long().clone()
        self.dim = self.sums.shape[1] if len(self.counts) else None


class RidgeClassifier:
    """RanPAC's ridge over random ReLU features (projection M > 0) or over the features themselves."""

    def __init__(self, dim: int, projection: int = PROJECTION, seed: int = 0, lambdas=None):
        self.dim, self.projection, self.seed = int(dim), int(projection), int(seed)
        self.lambdas = None if lambdas is None else torch.as_tensor(lambdas, dtype=torch.float64).sort().values
        if self.lambdas is not None and (self.lambdas.ndim != 1 or not len(self.lambdas) or self.lambdas.min() <= 0):
            raise ValueError(f"lambdas must be a non-empty list of positive numbers, got {lambdas}")
        # Drawn in float32 and stored with the state: G and C are sums over exactly this matrix, and
        # torch does not promise the same random stream for a seed across versions.
        self.weight_in = (torch.randn(self.dim, self.projection, generator=torch.Generator().manual_seed(self.seed))
                          if self.projection > 0 else None)
        self._reset(self.projection or self.dim)

    def _reset(self, m: int) -> None:
        self.G = torch.zeros(m, m, dtype=torch.float64)
        self.C = torch.zeros(m, 0, dtype=torch.float64)      # one column per class id
        self.counts = torch.zeros(0, dtype=torch.int64)
        self.W: Tensor | None = None
        self.lam: float | None = None
        self.grid = self.scores = None  # after fit(lam=None): the lams tried, their accuracy or -GCV

    @property
    def classes(self) -> list[int]:
        return torch.nonzero(self.counts).flatten().tolist()

    def features(self, x: Tensor) -> Iterator[Tensor]:
        """float64 features the ridge sees, one block of rows at a time."""
        for xs in x.split(CHUNK):
            yield xs.double() if self.weight_in is None else torch.relu(xs.double() @ self.weight_in.double())

    def update(self, x: Tensor, y: Tensor) -> None:
        _rows(x, y, self.dim)
        if not len(y):
            return
        y, k = y.long(), max(int(y.max()) + 1, len(self.counts))
        self.C, self.counts = _grow(self.C, k, 1), _grow(self.counts, k, 0) + torch.bincount(y, minlength=k)
        for h, ys in zip(self.features(x), y.split(CHUNK)):
            self.G += h.T @ h
            self.C.T.index_add_(0, ys, h)  # C^T's rows are C's columns: adds each row to its class
        self.W = None  # stale until fit()

    def fit(self, val_x: Tensor | None = None, val_y: Tensor | None = None, lam: float | None = None):
        """W = (G + lam I)^-1 C; lam=None picks lam from the grid (module docstring). Returns self."""
        if not self.counts.any():
            raise ValueError("nothing to fit: update() the classifier with rows first")
        seen = self.counts > 0
        if lam is not None:  # G + lam I is symmetric positive definite: Cholesky, not eigh
            eye = torch.eye(len(self.G), dtype=torch.float64)
            self.W, self.lam = torch.cholesky_solve(self.C, torch.linalg.cholesky(self.G + lam * eye)), float(lam)
            return self
        e, q = _eigh(self.G)
        e = e.clamp_min(0)  # G is positive semi-definite; rounding leaves tiny negative eigenvalues
        b = q.T @ self.C
        scale = float(e.mean()) if float(e.mean()) > 0 else 1.0
        grid = self.lambdas if self.lambdas is not None else GRID * scale
        if val_x is not None:
            _rows(val_x, val_y, self.dim)
            known = val_y < len(seen)
            keep = known.clone()
            keep[known] = seen[val_y[known]]  # validation rows of the seen classes only
            val_x, val_y = val_x[keep], val_y[keep]
        if val_x is not None and len(val_y):
            a = torch.cat([h @ q for h in self.features(val_x)])
            scores = torch.stack([((a / (e + l)) @ b).masked_fill(~seen, float("-inf")).argmax(1).eq(val_y)
                                  .double().mean() for l in grid])
        else:  # RSS from the sums alone: |Y|^2 - 2 tr(W^T C) + tr(W^T G W), and |Y|^2 = N for one-hot Y
            n, den = float(self.counts.sum()), e + grid.unsqueeze(1)
            rss = (n - ((e + 2 * grid.unsqueeze(1)) / den ** 2 * (b ** 2).sum(1)).sum(1)).clamp_min(0)
            rest = n - (e / den).sum(1)  # N - df; near 0 the fit interpolates and GCV means nothing
            scores = torch.where(rest > 0.5, -rss / rest.clamp_min(0.5) ** 2, float("-inf"))
        best = int(torch.nonzero(scores == scores.max()).max()) if scores.max() > float("-inf") else len(grid) - 1
        self.lam, self.grid, self.scores = float(grid[best]), grid, scores
        self.W = q @ (b / (e + grid[best]).unsqueeze(1))
        return self

    def logits(self, x: Tensor) -> Tensor:
        _rows(x, None, self.dim)
        if self.W is None:
            raise RuntimeError("the ridge classifier has rows it has not fitted: call fit() after update()")
        # scores only rank classes: float32 is exact enough here, and twice as fast as the sums' float64
        w_in, w = (None if self.weight_in is None else self.weight_in.float()), self.W.float()
        out = torch.cat([(xs.float() if w_in is None else torch.relu(xs.float() @ w_in)) @ w for xs in x.split(CHUNK)]) \
            if len(x) else x.new_zeros(0, self.W.shape[1]).float()
        return out.masked_fill(self.counts == 0, float("-inf"))

    def state_dict(self) -> dict[str, Tensor]:
        d = {"G": self.G.clone(), "C": self.C.clone(), "counts": self.counts.clone()}
        if self.weight_in is not None:
            d["projection"] = self.weight_in.clone()
        if self.W is not None:
            d["W"], d["lam"] = self.W.clone(), torch.tensor(self.lam, dtype=torch.float64)
        return d

    def load_state_dict(self, d: dict[str, Tensor]) -> None:
        dim, m = tuple(d["projection"].shape) if "projection" in d else (d["G"].shape[0], 0)
        if (dim, m) != (self.dim, self.projection):
            raise ValueError(f"state of a ridge on {dim} features with projection {m}, "
                             f"this one has {self.dim} and {self.projection}")
        self._reset(m or dim)
        self.weight_in = d["projection"].float().clone() if m else None
        self.G, self.C, self.counts = d["G"].double().clone(), d["C"].double().clone(), d["counts"].long().clone()
        if "W" in d:
            self.W, self.lam = d["W"].double().clone(), float(d["lam"])
