"""Prune a finished run: magnitude (unstructured) or channel (structured) pruning, with recovery.

    unstructured  torch.nn.utils.prune zeroes the smallest weights of every conv and linear layer
                  (per layer, or ranked across the whole network with global=True). The tensors stay
                  dense: the zipped model shrinks, dense latency does not.
    structured    torch-pruning removes whole channels, following the dependency graph (depthwise
                  convs, residual adds, BatchNorm, the head's input), so the network really gets
                  smaller and faster. The classifier's outputs are never touched; with
                  channels="inner", neither are the residual stream's widths.

Both run an iterative schedule: prune to amount*k/K (structured: channels ranked by Taylor
importance on training images, by default), re-estimate BatchNorm statistics on training images
where that helps on validation (calibrate), fine-tune the whole network on the run's training
images for a few epochs with those statistics fixed, recalibrate again, repeat for k = 1..K.
With `distill`, recovery learns the unpruned model's logits, and `transfer` adds unlabeled images
that only those logits label (more data for the recovery than the run's labeled split).
The result is a new run folder (same config, model.safetensors + model.json, report) that
`load_model`, `graft evaluate` and `graft predict` use like any other; prune.json records the
settings and the before/after numbers. The new folder checkpoints after each step's pruning and
each recovery epoch: `prune_run(resume=folder)` (`graft prune --resume`) continues a killed run.
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, GraftError
from ..evaluation import finish_evaluation
from ..io import atomic_write_json
from ..model import load_model, save_model
from ..progress import log
from ..run import create_run, run_scope, write_history
from ..train.checkpoint import FILE as CHECKPOINT, checkpoint_meta, load_checkpoint, save_checkpoint
from ..train.loop import Callback, State
from ..shapes import module_shapes, shape_changes
from .source import Recovery, Run, finetune  # noqa: F401  (Run and finetune are imported from here too)
from .teach import loss_card, transfer_images

METHODS = ("unstructured", "structured")


@dataclass
class PruneSettings:
    method: str = "structured"
    amount: float = 0.3            # unstructured: fraction of weights zeroed; structured: of channels
    global_pruning: bool = False   # rank weights/channels across layers instead of within each layer
    steps: int = 1                 # iterative schedule: K prune-then-recover rounds to reach `amount`
    finetune_epochs: int = 1       # recovery epochs after each step (0: prune only)
    lr: float = 1e-4               # whole-network fine-tune: a small rate keeps the pretrained features
    batch_size: int | None = None  # None: the run's train.batch_size
    round_to: int | None = None    # structured: keep channel counts multiples of this (1: any count);
                                   # None: 16, 8 or 1 by the narrowest pruned layer (auto_round_to)
    distill: float = 0.0           # recovery loss: this weight on distillation from the unpruned
                                   # model's logits (cached per training image), the rest on labels
    temperature: float = 4.0
    seed: int = 0
    importance: str = "taylor"     # structured: rank channels by |weight x gradient| of the label loss
                                   # ("taylor", on importance_images training images) or by weight norm
    importance_images: int = 256
    calibrate: int = 2000          # training images that re-estimate BatchNorm statistics after each
                                   # pruning step and after recovery, kept where validation accuracy
                                   # does not drop (0: never)
    bn: str = "eval"               # BatchNorm during recovery: "eval" keeps the recalibrated statistics
                                   # (as graft finetune does), "train" normalises with batch statistics
    transfer: str | None = None    # unlabeled images (as graft distill --transfer) that join the
                                   # recovery, labeled by the unpruned model's logits (needs distill)
    transfer_max: int | None = None
    channels: str = "all"          # structured: "inner" prunes only channels inside blocks and keeps
                                   # the widths that residual adds tie together (see tied_layers)

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"prune method {self.method!r}: use one of {', '.join(METHODS)}")
        if not 0 < self.amount < 1:
            raise ConfigError(f"prune amount {self.amount}: must be a fraction in (0, 1), e.g. 0.3")
        if self.steps < 1 or self.finetune_epochs < 0 or self.lr <= 0:
            raise ConfigError("prune: steps must be >= 1, finetune_epochs >= 0 and lr > 0")
        if not 0 <= self.distill <= 1 or self.temperature <= 0:
            raise ConfigError("prune: distill must be in [0, 1] and temperature > 0")
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError("prune: round_to must be a positive channel count")
        if self.importance not in ("taylor", "magnitude") or self.importance_images < 1:
            raise ConfigError(f"prune importance {self.importance!r}: use taylor or magnitude (and "
                              "importance_images >= 1)")
        if self.channels not in ("all", "inner"):
            raise ConfigError(f"prune channels {self.channels!r}: use all or inner")
        if self.calibrate < 0 or self.bn not in ("eval", "train"):
            raise ConfigError("prune: calibrate must be >= 0 images and bn one of eval, train")
        if self.transfer and not (self.distill and self.finetune_epochs):
            raise ConfigError("prune: transfer images are labeled by the unpruned model, so they need "
                              "recovery by distillation (distill > 0 and finetune_epochs > 0)")


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over the conv and linear layers (the ones magnitude pruning touches)."""
    weights = [m.weight for m, _ in prunable(model)]
    return sum((w == 0).sum().item() for w in weights) / max(1, sum(w.numel() for w in weights))


def magnitude_prune(model: nn.Module, amount: float, global_pruning: bool) -> dict[nn.Parameter, torch.Tensor]:
    """Zero the smallest-magnitude weights to a total sparsity of `amount` and make it permanent.
    Already-zero weights rank first, so calling this again with a larger amount extends the masks.
    Returns {weight: mask} for MaskKeeper."""
    from torch.nn.utils import prune
    params = prunable(model)
    if global_pruning:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    else:
        for module, name in params:
            prune.l1_unstructured(module, name, amount=amount)
    masks = {}
    for module, name in params:
        mask = getattr(module, f"{name}_mask").detach().clone()
        prune.remove(module, name)  # weight = weight_orig * mask, as a plain parameter again
        masks[getattr(module, name)] = mask
    return masks


class MaskKeeper(Callback):
    """Re-zero pruned weights after every optimizer step: the gradient (and Adam's momentum) would
    otherwise grow them back during the recovery fine-tune."""

    def __init__(self, masks: dict[nn.Parameter, torch.Tensor]):
        self.masks = masks

    @torch.no_grad()
    def after_step(self, state: State) -> None:
        for weight, mask in self.masks.items():
            weight.mul_(mask.to(weight.dtype))


class PruneProgress(Callback):
    """Pruning's own progress (step, phase, channels removed so far) in every checkpoint: what
    `--resume` replays on the source network before loading the pruned weights."""
    key = "prune"

    def __init__(self, progress: dict):
        self.progress = progress

    def state_dict(self) -> dict:
        return self.progress


def _norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, limit: int) -> int:
    """Re-estimate every BatchNorm's running mean and variance on up to `limit` training images, with
    no gradient step. Removing channels changes the sums that feed every later layer, so the old
    statistics no longer fit them (the "adaptive BN" observation of EagleEye, Li et al. 2020).
    Whether fresh statistics beat the stored ones depends on how the model was trained: calibrate()
    keeps them only when validation accuracy does not drop. Returns the number of images seen."""
    norms = _norms(model)
    if not norms or limit <= 0:
        return 0
    momentum = {m: m.momentum for m in norms}
    was_training = model.training
    model.eval()  # dropout off; only the norms see batches in training mode
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every calibration batch
        m.train()
    seen = 0
    for x, _ in batches:
        model(x)
        seen += len(x)
        if seen >= limit:
            break
    for m in norms:
        m.momentum = momentum[m]
    model.train(was_training)
    return seen


def count(model: nn.Module, image_size: int) -> tuple[int, int]:
    """(MACs of one image, parameters), by torch-pruning's counter on a copy of the model."""
    import torch_pruning as tp
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size))
    return int(macs), int(params)


def file_sizes(path: Path) -> dict:
    """Bytes on disk and after deflate (what a zip of the file holds): zeros compress, dense floats don't."""
    data = path.read_bytes()
    return {"bytes": len(data), "deflate_bytes": len(zlib.compress(data, 6))}


def calibrate(run: Run, model: nn.Module, images: int, seed: int, score,
              before: float | None = None) -> tuple[float, bool]:
    """recalibrate_bn on `images` shuffled, unaugmented training images of the run, kept only if
    `score()` (validation accuracy; NaN without a validation split: always kept) does not drop. A
    model fine-tuned with BatchNorm in eval mode (graft finetune's default) adapted its weights to
    the stored, ImageNet statistics, and fresh ones can cost it more than the pruning did (measured:
    BENCHMARKS.md). `before`: the score now, when the caller has it. Returns (the score of the
    statistics kept, whether the new ones were kept)."""
    before = score() if before is None else before
    if not images:
        return before, False
    norms = _norms(model)
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    batches = run.batches("train", run.cfg.train.eval_batch_size, torch.Generator().manual_seed(seed))
    recalibrate_bn(model, batches, images)
    model.eval()
    after = score()
    if after < before:  # NaN compares False: kept
        for m, (mean, var, count) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        return before, False
    return after, True


def taylor_gradients(run: Run, model: nn.Module, images: int, seed: int) -> None:
    """Fill .grad with the label loss's gradients over `images` training images: what the Taylor
    importance (|weight x gradient|, the loss change from removing a channel) ranks channels by."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.zero_grad()
    model.eval()
    seen = 0
    for x, y in run.batches("train", 32, torch.Generator().manual_seed(seed)):
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        seen += len(y)
        if seen >= images:
            break


def tied_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """One layer of each channel group that a residual add ties across several dense
    layers: the widths of a network's residual stream. Ignoring these leaves only the channels
    inside blocks (an inverted residual's expansion and depthwise channels, a bottleneck's middle)."""
    import torch_pruning as tp
    graph = tp.DependencyGraph().build_dependency(model, example)
    tied = []
    for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        dense = {id(d.target.module): d.target.module for d, _ in group
                 if graph.is_out_channel_pruning_fn(d.handler) and isinstance(d.target.module, (nn.Conv2d, nn.Linear))
                 and not (isinstance(d.target.module, nn.Conv2d) and d.target.module.groups > 1)}
        if len(dense) > 1:
            tied.append(next(iter(dense.values())))
    return tied


def auto_round_to(layers: list[nn.Module]) -> int:
    """The channel multiple structured pruning keeps when none is given: 16 when every pruned layer
    is at least 32 wide, 8 from 16, else 1 (any count). ONNX Runtime's CPU convolutions run blocked
    kernels of 8 or 16 channels, and a layer of another width falls back to slower ones. Measured
    (BENCHMARKS.md, pruning: channel counts; bench/prune_round.py) on Lite0 at 160 px with 39% of
    the channels inside blocks removed (MACs 0.56x), timed in turns with the unpruned model (batch
    1 / 64): unrounded, fp32 0.76x / 0.58x its speed and int8 0.97x / 0.86x; multiples of 8, int8
    1.42x / 1.31x; of 16, 1.55x / 1.49x. A layer narrower than twice the multiple would lose most
    of its channels to the rounding (torch-pruning rounds what is kept down), hence the steps."""
    narrowest = min((m.out_channels if isinstance(m, nn.Conv2d) else m.out_features for m in layers), default=0)
    return 16 if narrowest >= 32 else 8 if narrowest >= 16 else 1


def channel_pruner(model: nn.Module, image_size: int, s: PruneSettings):
    """torch-pruning's MetaPruner for structured pruning with these settings (the class outputs are
    never pruned; with channels="inner", neither are the residual stream's widths). With Taylor
    importance, call taylor_gradients before each step()."""
    import torch_pruning as tp
    model.eval()
    example = torch.zeros(1, 3, image_size, image_size)
    importance = (tp.importance.GroupTaylorImportance() if s.importance == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    ignored = [model.mlp[-1]] + (tied_layers(model, example) if s.channels == "inner" else [])
    round_to = s.round_to or auto_round_to([m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                                            and not any(m is i for i in ignored)])
    return tp.pruner.MetaPruner(model, example, importance=importance,
                                global_pruning=s.global_pruning, pruning_ratio=s.amount, iterative_steps=s.steps,
                                ignored_layers=ignored, round_to=None if round_to == 1 else round_to,
                                max_pruning_ratio=0.9)


def prune_run(run_dir: str | Path | None, settings: PruneSettings | None, out: str | None = None,
              name: str | None = None, resume: str | Path | None = None, test: bool = True) -> Path:
    """Prune the run in `run_dir` into a new run folder; returns its path. `resume`: a pruned run
    folder left by a killed `prune_run`; it continues after its last completed epoch (or pruning
    step) with the source run and settings it was started with. `test=False`: the test split is
    never scored (a search trial prunes and is judged on validation; prune.json's before and after
    hold val_acc), as train(test=False)."""
    saved = _resume_point(Path(resume)) if resume else None
    if saved:
        run_dir, settings = saved["source_run"], PruneSettings(**saved["settings"])
    settings.check()
    run = Run(run_dir)
    model, spec, s = run.model, run.spec, settings
    if spec.gate:   # its prototype head's statistics belong to the unpruned backbone's features
        raise ConfigError(f"prune: {run.dir} was extended with new classes (`graft extend`); prune the "
                          "original run, then extend the pruned one")
    shapes_before = module_shapes(model)
    test = "test_acc" in saved["before"] if saved else test   # a resumed run is scored as it started
    split = "test" if test else "val"
    score = f"{split}_acc"
    if saved:
        before = saved["before"]
        new_dir = Path(resume)
    else:
        macs, params = count(model, spec.image_size)
        before = {score: run.accuracy(model, split), "params": params, "macs": macs, "sparsity": sparsity(model)}
        tag = f"{s.method}{round(s.amount * 100)}"
        new_dir = create_run(out or run.dir.parent, name or f"{run.dir.name}-pruned-{tag}", spec.backbone,
                             run.cfg, s.seed)
    with run_scope(new_dir, keep_if=CHECKPOINT, remove=not saved):
        log(f"pruning {run.dir} ({s.method}, {s.amount:.0%} in {s.steps} step(s), "
            f"{s.finetune_epochs} recovery epoch(s) each): {split} accuracy before {before[score]:.4f}")
        generator = torch.Generator().manual_seed(s.seed)
        torch.manual_seed(s.seed)
        state, steps, done, record = State(), [], 0, None
        batch_size = s.batch_size or run.cfg.train.batch_size
        teacher = None
        if s.distill and s.finetune_epochs:
            if run.cfg.train.augment != "none":
                raise ConfigError("prune: recovery by distillation caches the unpruned model's logits "
                                  "per image, which needs a run trained without augmentation")
            teacher = run.logits(model, "train")
            if s.transfer:  # the unpruned model labels them; the student learns from its soft targets
                _, run.sets["transfer"] = transfer_images(run.cfg, s.transfer, s.transfer_max, run.source,
                                                          run.sets, spec.image_size)
                run.sets["recovery"] = run.sets["train"].joined(run.sets["transfer"])
                teacher = torch.cat([teacher, run.logits(model, "transfer")])
        pruner = channel_pruner(model, spec.image_size, s) if s.method == "structured" else None
        if saved:  # replay the removed channels on the source network, then load the pruned weights
            if pruner is not None:
                pruner.load_pruning_history(saved["channels"])
                pruner.current_step = saved["k"]
                # each ranking scope's channel count when first pruned: later steps' targets are
                # fractions of it, and torch-pruning records it lazily, at the first step it runs
                pruner._scope_initial_channels = dict(saved["scopes"])
            state = load_checkpoint(new_dir, model, None, generator, optimizer_state=False)
            steps, done = saved["steps"], saved["k"] - (saved["phase"] != "complete")
            record = None if saved["phase"] == "complete" else saved["record"]
            log(f"resuming after pruning step {saved['k']}"
                + ("" if record is None else f", recovery epoch {state.epoch - done * s.finetune_epochs}"))

        def checkpoint(k: int, phase: str, record: dict | None) -> PruneProgress:
            return PruneProgress({"source_run": str(run.dir.resolve()), "settings": asdict(s), "before": before,
                                  "k": k, "phase": phase, "record": record, "steps": steps,
                                  "channels": pruner.pruning_history() if pruner is not None else [],
                                  "scopes": getattr(pruner, "_scope_initial_channels", {})})
        masks: dict = {}
        for k in range(done + 1, s.steps + 1):
            val_acc = (lambda: run.accuracy(model, "val")) if len(run.sets["val"]) else (lambda: float("nan"))
            resuming = record is not None
            if resuming:  # pruned already: the zeros in the weights are the masks
                masks = {m.weight: (m.weight != 0) for m, _ in prunable(model)} if s.method == "unstructured" else {}
            else:
                if s.method == "structured":
                    if s.importance == "taylor":
                        taylor_gradients(run, model, s.importance_images, s.seed + k)
                    pruner.step()
                    model.zero_grad(set_to_none=True)
                else:
                    masks = magnitude_prune(model, s.amount * k / s.steps, s.global_pruning)
                pruned_acc = val_acc()
                calibrated_acc, kept = calibrate(run, model, s.calibrate, s.seed + k, val_acc, pruned_acc)
                record = {"step": k, "val_acc_pruned": pruned_acc, "val_acc_recalibrated": calibrated_acc,
                          "recalibrated_kept": kept}
                save_checkpoint(new_dir, model.state_dict(), None, state, generator,
                                callbacks=[checkpoint(k, "pruned", record)])
            state.stage = f"step {k}: {s.amount * k / s.steps:.0%} {'channels' if pruner else 'weights'} pruned"
            recovery = Recovery(k * s.finetune_epochs - state.epoch, s.lr, batch_size, teacher, s.distill,
                                s.temperature, s.bn, split="recovery" if s.transfer else "train",
                                checkpoint=new_dir, resume=resuming and state.epoch > (k - 1) * s.finetune_epochs)
            finetune(run, model, recovery, state,
                     [*([MaskKeeper(masks)] if masks else []), checkpoint(k, "recovering", record)], generator)
            recovered = record["val_acc_recalibrated"]
            if s.finetune_epochs:  # the recovered weights may deserve their own statistics
                recovered, _ = calibrate(run, model, s.calibrate, s.seed + k, val_acc, val_acc())
            macs, params = count(model, spec.image_size)
            steps.append({**record, "params": params, "macs": macs, "sparsity": sparsity(model),
                          "val_acc_recovered": recovered})
            record = None
            save_checkpoint(new_dir, model.state_dict(), None, state, generator,
                            callbacks=[checkpoint(k, "complete", None)])
            log(f"step {k}/{s.steps}: params {params:,}  MACs {macs:,}  sparsity {steps[-1]['sparsity']:.3f}  "
                f"val acc {steps[-1]['val_acc_pruned']:.4f} pruned -> {steps[-1]['val_acc_recalibrated']:.4f} "
                f"BatchNorm {'recalibrated' if steps[-1]['recalibrated_kept'] else 'kept (recalibration did not help)'}"
                f" -> {recovered:.4f} recovered")
        for p in model.parameters():
            p.requires_grad_(False)
        new_spec = replace(spec, pruned=shape_changes(shapes_before, module_shapes(model)))
        new_spec.feature_dim = model.mlp[0].in_features
        save_model(model, new_spec, new_dir)
        _check_reload(model, new_dir, spec.image_size)
        write_history(new_dir, state.history)
        macs, params = count(model, spec.image_size)
        if not test:
            after = {"val_acc": steps[-1]["val_acc_recovered"] if steps else before[score], "params": params,
                     "macs": macs}
            atomic_write_json(new_dir / "prune.json", {"source_run": str(run.dir), "settings": asdict(s),
                                                       "steps": steps, "before": before, "after": after})
            log(f"pruned: val acc {before[score]:.4f} -> {after['val_acc']:.4f}; params {params:,}; {new_dir}")
            return new_dir
        logits = run.logits(model)
        m = finish_evaluation(new_dir, run.cfg, new_spec, state.history, logits, run.sets["test"].labels,
                              run.sets["test"], run.sets["train"],
                              cards={"test accuracy before pruning": f"{before['test_acc']:.4f}",
                                     **loss_card(s.distill, s.temperature),
                                     **({"recovery transfer images": f"{len(run.sets['transfer']):,} unlabeled"}
                                        if "transfer" in run.sets else {}),
                                     "MACs": f"{macs / 1e6:.1f} M (was {before['macs'] / 1e6:.1f} M)",
                                     "parameters": f"{params / 1e6:.2f} M (was {before['params'] / 1e6:.2f} M)"})
        report = {"source_run": str(run.dir), "settings": asdict(s), "steps": steps,
                  "transfer_images": len(run.sets.get("transfer", ())),
                  "before": {**before, **file_sizes(run.dir / "model.safetensors")},
                  "after": {"test_acc": m["accuracy"], "params": params, "macs": macs,
                            "sparsity": sparsity(model), **file_sizes(new_dir / "model.safetensors")}}
        atomic_write_json(new_dir / "prune.json", report)
        b, a = report["before"], report["after"]
        log(f"pruned: test acc {b['test_acc']:.4f} -> {a['test_acc']:.4f}; params {b['params']:,} -> "
            f"{a['params']:,}; MACs {b['macs']:,} -> {a['macs']:,}; sparsity {a['sparsity']:.3f}; zipped "
            f"{b['deflate_bytes'] / 1e6:.2f} -> {a['deflate_bytes'] / 1e6:.2f} MB; {new_dir}")
        return new_dir


def _resume_point(run_dir: Path) -> dict:
    """The pruning state saved in a killed prune run's checkpoint, or a clear error."""
    meta = checkpoint_meta(run_dir)
    if meta is None or "prune" not in meta.get("callbacks", {}):
        raise GraftError(f"{run_dir}: nothing to resume: no pruning checkpoint ({CHECKPOINT} is missing "
                         "or was not written by `graft prune`)")
    if (run_dir / "prune.json").is_file():
        raise GraftError(f"{run_dir}: this pruning run finished already (prune.json exists)")
    return meta["callbacks"]["prune"]


@torch.no_grad()
def _check_reload(model: nn.Module, run_dir: Path, image_size: int) -> None:
    """The saved folder must rebuild the pruned network exactly: compare logits on a random batch."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    model.eval()
    reloaded, _ = load_model(run_dir)
    if not torch.allclose(model(x), reloaded(x), atol=1e-4, rtol=1e-4):
        raise GraftError(f"{run_dir}: the saved pruned model does not reproduce the pruned network's "
                         "outputs (please report this)")
    log(f"saved and reloaded {run_dir / 'model.safetensors'}: same logits")
