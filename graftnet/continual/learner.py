"""Learning a task sequence with one method and seed: the head trained task after task on the one
training loop (train/loop.py's `fit`, the methods joining as callbacks), or a prototype classifier
updated task after task; after each task every task's test rows are scored, giving one row of the
accuracy matrix.

Outputs a run has so far: the seen classes (class-incremental: one growing head, every row scored
over all outputs seen so far) or, task-incremental, each row's own task's outputs (a head per
task; the task is known at test time). Class-incremental, the same logits also give the
within-task matrix (each task's rows among its own task's outputs only: score_within), which
leaves out new classes competing for old rows. A run folder is resumable by task: after each task the
head, every callback's state and the matrix so far are written (safetensors + JSON, atomically),
and each task's shuffling is seeded from (seed, task), so a run resumed after task k equals one
never stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..config import RunConfig
from ..heads import make_mlp
from ..io import atomic_write_json, save_tensors
from ..progress import log
from ..train.callbacks import schedule
from ..train.loop import State, feature_batches, fit, predict_logits
from ..train.optim import make_optimizer
from .data import TaskTable
from .methods import TaskCallback, method_parts
from .prototype import NearestClassMean, RidgeClassifier
from .tasks import ContinualSettings

PROGRESS, STATE = "progress.json", "continual_state.safetensors"


class Visible(nn.Module):
    """The head with the outputs not yet learned masked out (-inf): a class-incremental head grows."""

    def __init__(self, head: nn.Module, visible: torch.Tensor):
        super().__init__()
        self.head, self.visible = head, visible

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).masked_fill(~self.visible, float("-inf"))


def masked_loss(own_task: torch.Tensor | None) -> callable:
    """Cross-entropy over the outputs a row may use: all visible ones (class-incremental), or its own
    task's (`own_task[class]`: the class's task's columns as a mask row; task-incremental)."""
    def loss(logits: torch.Tensor, y: torch.Tensor, *targets) -> torch.Tensor:
        if own_task is not None:
            logits = logits.masked_fill(~own_task[y], float("-inf"))
        return F.cross_entropy(logits, y)
    return loss


def score(table: TaskTable, logits: torch.Tensor, y: torch.Tensor, task: torch.Tensor, scenario: str,
          visible: torch.Tensor) -> list[float]:
    """Accuracy on each task's rows: over the visible outputs, or over the row's own task's."""
    out = []
    for i, cols in enumerate(table.task_cols):
        rows = task == i
        if not rows.any():
            out.append(float("nan"))
            continue
        if scenario == "task":
            pred = cols[logits[rows][:, cols].argmax(1)]
        else:
            masked = logits[rows].masked_fill(~visible, float("-inf"))
            pred = masked.argmax(1) if visible.any() else torch.full((int(rows.sum()),), -1)
        out.append((pred == y[rows]).float().mean().item())
    return out


def score_within(table: TaskTable, logits: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> list[float]:
    """Accuracy on each task's rows with the prediction restricted to that task's own outputs (argmax
    over its columns only): the task-aware reading of a class-incremental model ("within-task
    accuracy", van de Ven et al.'s task-incremental evaluation of a class-incremental learner). It
    leaves out the new classes competing for an old task's rows, so what it loses is knowledge lost.
    For a task-incremental run it is `score` itself, which is also how it is computed."""
    return score(table, logits, y, task, "task", torch.ones(logits.shape[1], dtype=torch.bool))


class Learner:
    """One method and seed over a task table, writing into `run_dir`."""

    def __init__(self, table: TaskTable, method: str, seed: int, settings: ContinualSettings, cfg: RunConfig,
                 run_dir: Path, base: nn.Module | None = None):
        """`base`: the grafted model whose top groups train when settings.top_groups > 0 (the table's
        rows are then the maps below them)."""
        self.table, self.method, self.seed, self.s, self.cfg, self.dir = table, method, seed, settings, cfg, run_dir
        self.base = base
        self.parts = method_parts(method)
        self.gradient = self.parts[0].gradient
        self.cumulative = self.parts[0].cumulative
        k = len(table.classes)
        own = torch.zeros(k, k, dtype=torch.bool)
        for cols in table.task_cols:
            own[cols.unsqueeze(1), cols] = True
        self.own_task = own if settings.scenario == "task" else None
        self.head = self._new_head()
        self.callbacks: list[TaskCallback] = [cb for m in self.parts for cb in m.callbacks(self.head, settings)]
        self.proto = None
        if not self.gradient:
            width = self.head.body[-2].out_channels if settings.top_groups else table.dim  # conv_head's
            self.proto = (NearestClassMean() if method == "ncm" else
                          RidgeClassifier(width, projection=settings.projection, seed=seed))
        self._proto_cache: dict[str, torch.Tensor] = {}   # _proto_features, per split
        self.preset: nn.Module | None = None   # a finished run's head: the first task counts as learned
        self.matrix: list[list[float]] = []
        self.val_matrix: list[list[float]] = []   # the same on validation rows: to choose a method's settings
        # class-incremental: the test rows' accuracy among their own task's classes (score_within),
        # from the same logits; None when a run resumed from a record written without it. A
        # task-incremental matrix is this already (score restricts to the own task), so it is not kept twice.
        self.within_matrix: list[list[float]] | None = [] if settings.scenario == "class" else None
        self.initial: list[float] = []
        self.seconds: list[float] = []
        self.history: list[dict] = []

    def _new_head(self) -> nn.Module:
        torch.manual_seed(self.seed)
        if self.s.top_groups:
            from .top import Top
            width = self.base.extractor.model.conv_head.out_channels
            return Top(self.base, self.s.top_groups, make_mlp(width, len(self.table.classes), self.cfg.head))
        return make_mlp(self.table.dim, len(self.table.classes), self.cfg.head)

    # --- resume by task -------------------------------------------------------------------------
    def _save(self) -> None:
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for cb in self.callbacks:
            tensors.update({f"cb.{cb.key}.{k}": v for k, v in cb.state_dict().items()})
        if self.proto is not None:
            tensors.update({f"proto.{k}": v for k, v in self.proto.state_dict().items()})
        save_tensors(self.dir / STATE, {k: v.contiguous() for k, v in tensors.items()})
        atomic_write_json(self.dir / PROGRESS, {"method": self.method, "seed": self.seed, "matrix": self.matrix,
                                                "initial": self.initial, "seconds": self.seconds,
                                                "val_matrix": self.val_matrix,
                                                "within_matrix": self.within_matrix,
                                                "history": self.history})

    def _load(self) -> None:
        path = self.dir / PROGRESS
        if not path.is_file() or not (self.dir / STATE).is_file():
            return
        done = json.loads(path.read_text())
        self.matrix, self.initial, self.seconds, self.history = (done["matrix"], done["initial"], done["seconds"],
                                                                 done.get("history", []))
        self.val_matrix = done.get("val_matrix", [])
        if self.within_matrix is not None:   # a progress file from before it was kept: the rows so far are lost
            within = done.get("within_matrix")
            self.within_matrix = within if within is not None and len(within) == len(self.matrix) else None
        tensors = load_file(str(self.dir / STATE))
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        for cb in self.callbacks:
            prefix = f"cb.{cb.key}."
            cb.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.proto is not None:
            self.proto.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("proto.")})
        if self.matrix:
            log(f"{self.dir.name}: resumed after task {len(self.matrix)} of {len(self.table.task_cols)}")

    # --- one task -------------------------------------------------------------------------------
    def visible(self, t: int) -> torch.Tensor:
        v = torch.zeros(len(self.table.classes), dtype=torch.bool)
        for cols in self.table.task_cols[:t + 1]:
            v[cols] = True
        return v

    @torch.no_grad()
    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        """A prototype method's features: the rows themselves, or, with a top adapted on the first
        task, the cached maps through it, pooled."""
        if not self.s.top_groups:
            return x
        self.head.eval()
        return torch.cat([self.head.body(xs.float()).mean((2, 3)) for xs in x.split(256)]) if len(x) \
            else torch.empty(0, self.head.body[-2].out_channels)

    def _proto_features(self, split: str) -> torch.Tensor:
        """_pooled of a whole split, once: the adapted top is frozen after the first task, so its
        features of a row never change (one pass per split, not one per task and evaluation)."""
        if split not in self._proto_cache:
            self._proto_cache[split] = self._pooled(self.table.x[split])
        return self._proto_cache[split]

    def logits(self, x: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """Logits of rows `x` (for a prototype method, `pooled`: x are its features already)."""
        if self.proto is not None:
            out = torch.full((len(x), len(self.table.classes)), float("-inf"))
            if self.proto.classes:
                got = self.proto.logits(x if pooled else self._pooled(x))
                out[:, :got.shape[1]] = got
            return out
        return predict_logits(self.head, feature_batches(x, torch.zeros(len(x), dtype=torch.long),
                                                           self.cfg.train.eval_batch_size, None))[0]

    def evaluate(self, t: int, split: str = "test", within: list | None = None) -> list[float]:
        """One row of the accuracy matrix after task t; `within`: a list that receives the same
        row scored within each task (score_within), from the same logits."""
        tb = self.table
        logits = self.logits(self._proto_features(split), pooled=True) if self.proto is not None and self.proto.classes \
            else self.logits(tb.x[split])
        if within is not None:
            within.append(score_within(tb, logits, tb.y[split], tb.task[split]))
        return score(tb, logits, tb.y[split], tb.task[split], self.s.scenario, self.visible(t))

    def learn_task(self, t: int) -> None:
        tb = self.table
        rows = tb.rows("train", range(t + 1) if self.cumulative else [t])
        x, y = tb.x["train"][rows], tb.y["train"][rows]
        generator = torch.Generator().manual_seed(self.seed * 1000 + t)
        if self.proto is not None:
            if self.s.top_groups and t == 0:   # first-task adaptation: the top learns task 1, then stays
                self._fit(t, x, y, generator)
                for p in self.head.parameters():
                    p.requires_grad_(False)
            self.proto.update(self._proto_features("train")[rows], y)
            if isinstance(self.proto, RidgeClassifier):
                seen = tb.rows("val", range(t + 1))
                self.proto.fit(self._proto_features("val")[seen], tb.y["val"][seen]) if len(seen) else self.proto.fit()
            return
        if self.cumulative:  # joint training: every task so far, from a fresh head
            self.head.load_state_dict(self._new_head().state_dict())
        self._fit(t, x, y, generator)

    def _fit(self, t: int, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Train the head (and a top of the backbone) on task t's rows, with the methods' callbacks."""
        tb, c = self.table, self.cfg.train
        task_x, task_y = x, y
        for cb in self.callbacks:
            x, y, _ = cb.feature_rows(None, x, y, None)
        visible = self.visible(t)
        # task-incremental: only the heads of the tasks in these rows (the task's own, and replayed
        # ones'), so the loop's accuracies are those of rows among their own task's outputs
        module = Visible(self.head, self.own_task[torch.unique(y)].any(0) if self.own_task is not None else visible)
        # a trained top of the backbone moves at fine-tuning's rate, the head at training's
        body = [p for n, p in self.head.named_parameters() if n.startswith("body.")]
        rest = [p for n, p in self.head.named_parameters() if not n.startswith("body.")]
        optimizer = make_optimizer([{"params": rest}, *([{"params": body, "lr": self.cfg.finetune.lr}] if body else [])],
                                   c.optimizer, c.lr, c.weight_decay)
        state = State(stage=tb.task_names[t])
        n_batches = -(-len(y) // c.batch_size)
        cbs = [*self.callbacks, *schedule(optimizer, c.schedule, c.warmup_epochs, c.epochs, 0, n_batches, state)]
        val = tb.rows("val", [t])
        make_val = (lambda: feature_batches(tb.x["val"][val], tb.y["val"][val], c.eval_batch_size, None)) \
            if len(val) else None
        fit(module, lambda: feature_batches(x, y, c.batch_size, generator), n_batches, make_val, optimizer,
            c.epochs, state, cbs, loss_fn=masked_loss(self.own_task))
        self.history += [{**r, "task": tb.task_names[t]} for r in state.history]
        cols = tb.task_cols[t] if self.s.scenario == "task" else torch.nonzero(visible).flatten()
        for cb in self.callbacks:
            cb.after_task(self.head, task_x, task_y, cols, generator)

    def run(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._load()
        if not self.initial:
            self.initial = self.evaluate(-1)
        if self.preset is not None and not self.matrix:
            self._take_preset()
        for t in range(len(self.matrix), len(self.table.task_cols)):
            t0 = time.perf_counter()
            self.learn_task(t)
            self.matrix.append(self.evaluate(t, within=self.within_matrix))
            self.val_matrix.append(self.evaluate(t, "val"))
            self.seconds.append(time.perf_counter() - t0)
            log(f"{self.dir.name}: task {t + 1}/{len(self.table.task_cols)} ({self.table.task_names[t]}) "
                f"accuracy per task " + " ".join(f"{a:.3f}" for a in self.matrix[-1][:t + 1])
                + f"  ({self.seconds[-1]:.1f}s)")
            self._save()
        out = {"matrix": self.matrix, "val_matrix": self.val_matrix, "initial": self.initial, "seconds": self.seconds}
        if self.within_matrix is not None:
            out["within_matrix"] = self.within_matrix
        return out

    def _take_preset(self) -> None:
        """Start from a finished run's head as if it had just learned task 1 (`graft extend`): its
        outputs are the first task's, the new outputs start as this head's fresh rows; the methods
        hear that task 1 ended (EWC's Fisher and LwF's teacher come from the finished head)."""
        own = self.head.state_dict()
        for k, v in self.preset.state_dict().items():
            if own[k].shape == v.shape:
                own[k] = v.clone()
            else:   # the output layer: the old classes' rows, the new ones' stay fresh
                own[k][:v.shape[0]] = v
        self.head.load_state_dict(own)
        rows = self.table.rows("train", [0])
        generator = torch.Generator().manual_seed(self.seed * 1000)
        cols = self.table.task_cols[0]
        for cb in self.callbacks:
            cb.after_task(self.head, self.table.x["train"][rows], self.table.y["train"][rows], cols, generator)
        self.matrix.append(self.evaluate(0, within=self.within_matrix))
        self.val_matrix.append(self.evaluate(0, "val"))
        self.seconds.append(0.0)
        self._save()

    def final_head(self) -> tuple[nn.Module, dict]:
        """The model after the last task as an ordinary head (an MLP over the features) and the head
        config that rebuilds it: predict, evaluate, export and serve read it like any run's."""
        if self.proto is None:
            return self.head, dict(vars(self.cfg.head))   # a Top puts itself into the model (Top.into)
        mlp, head_cfg = prototype_head(self.proto, self.proto.dim, len(self.table.classes), self.cfg.head.pool)
        if self.s.top_groups:   # the adapted top carries the prototype head
            self.head.mlp = mlp
            return self.head, head_cfg
        return mlp, head_cfg


def prototype_head(proto, dim: int, k: int, pool: str) -> tuple[nn.Sequential, dict]:
    """A prototype classifier as the MLP every run has: ridge on random features is Linear(D, M)
    (the fixed projection, no bias) -> ReLU -> Linear(M, K); ridge on the features, or nearest class
    mean, is one Linear. NCM's logits become x . m_c / |m_c|: the cosine times |x|, the same
    ranking of classes for every row (probabilities are sharper or flatter, predictions the same)."""
    layers: list[nn.Module] = []
    if isinstance(proto, RidgeClassifier):
        w = proto.W.T.float()                                   # K x M
        if proto.weight_in is not None:
            first = nn.Linear(dim, proto.projection)
            first.weight.data, first.bias.data = proto.weight_in.T.contiguous().float(), torch.zeros(proto.projection)
            layers += [first, nn.ReLU()]
        hidden = [proto.projection] if proto.weight_in is not None else []
    else:
        w = F.normalize(proto.sums / proto.counts.clamp_min(1).unsqueeze(1), dim=1).float()
        hidden = []
    last = nn.Linear(w.shape[1], k)
    last.weight.data = torch.zeros(k, w.shape[1])
    last.weight.data[:len(w)] = w
    last.bias.data = torch.zeros(k)
    return nn.Sequential(*layers, last), {"pool": pool, "hidden": hidden, "activation": "relu", "dropout": 0.0}
