"""The stages of `graft auto` after the probe, each a function of the base config and what the
earlier stages decided, returning the numbers its decision was made on (they go to decisions.json).

search    the head and feature taps by `graft search` on cached features, within its time share;
finetune  the search's best run with its backbone's top groups unfrozen, for the epochs the plan
          found time for; kept unless its validation accuracy is more than one standard
          error below the head's (the best of the search's trials, so optimistic);
resolution when the plan found time for it and no ensemble: the fine-tuned model on at a larger
          input for a few epochs; kept when validation gains MIN_STEP_GAIN;
ensemble  when the plan found time for them: more models fine-tuned alike from other seeds;
export    fp32 and int8 ONNX models of the kept run (and of the ensemble, merged into one file),
          each with its validation accuracy and its latency measured in ONNX Runtime (all of them
          timed again in turns, as every later stage's models are with the ones they must beat); of those
          within --max-latency-ms, the fastest within 0.5 points of the most accurate ships, with
          test-time flips when they pay and fit;
distill   only when the ensemble would ship but misses --max-latency-ms: the first member fine-tuned
          on with the ensemble as teacher; it ships when it beats the single models under the bound;
prune     only when no model meets --max-latency-ms: first the exported run fine-tuned on for an
          epoch at the largest smaller input the bound is estimated to allow (smaller_input; down to
          MIN_LATENCY_SCALE of its side), else, or when that misses the bound, with channels removed
          by `graft prune` as far as the bound asks (at most MAX_PRUNE), recovered for an epoch when
          the budget holds one; it ships when it meets the bound or is at least faster;
test      the shipped file scored on the test split, once.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..backbones import get_spec
from ..config import RunConfig, resolve
from ..errors import GraftError
from ..io import atomic_write_json
from ..progress import log
from ..search import DEFAULT_SPACE, SearchSettings, run_search
from ..search.measure import measure_run
from ..search.trial import saved_val_acc
from ..train.pipeline import train
from .budget import StopAtDeadline, shown
from .plan import IMBALANCED

MAX_TRIALS = 200          # the search stops on its time share long before this on real data
MAX_INT8_DROP = 0.005     # validation accuracy int8 may lose against fp32 and still ship (0.5 points)
MIN_TTA_GAIN = 0.005      # test-time flips double the latency: worth it from 0.5 points of validation accuracy
MIN_STEP_GAIN = 0.005     # a resolution step's larger input is slower (1.44x the pixels at 1.2x the side): 0.5 points
LATENCY_TIE = 1.10        # latencies this close count as equal when choosing what ships
FINETUNE_BATCH = 64       # images per step when fine-tuning: fits a CPU's memory at 224 px
# Fine-tuning as the best measured run does it (recipes/finetune-cifar10.yaml; BENCHMARKS.md, which
# groups to train): the top 5 of Lite0's 8 groups, so this share of any backbone's groups. With BatchNorm
# on its statistics, the first epoch scored 89.1% validation against 87.8% with all 8 groups trained,
# and the step runs 1.51x (128 px) to 2.61x (224 px) faster: the lowest groups' backward pass is the
# widest maps'. Rates as in the recipe: the head 5e-4, each earlier group 0.8 times the next, warmup.
FINETUNE_TOP_SHARE = 5 / 8
FINETUNE_SETTINGS = {"finetune.lr": 5e-4, "finetune.lr_decay": 0.8, "finetune.warmup_epochs": 0.2,
                     "finetune.batch_size": FINETUNE_BATCH}
# RandAugment pays over a long schedule and costs a short one: over 8 epochs it gave 93.34% test
# against 91.91% for 4 flip epochs, but its first epoch scored 86.5% validation against the flip
# run's 89.1% (CIFAR-10, Lite0 at 128 px, top 5 groups): flips below this many epochs
RANDAUGMENT_FROM = 6
# pruning for a latency bound: half of the channels inside blocks, with a recovery epoch after each of
# two steps, left Lite0 11.5 points below its base on CIFAR-10 (BENCHMARKS.md, pruning): no further
MAX_PRUNE = 0.5
PRUNE_MARGIN = 1.2
# A smaller input before pruning: the latency bound is met first by fewer pixels, which keep every
# channel. Measured: for a 1.25 ms bound on the 300-per-class slice (bench/auto.py latency300), 44% of
# Lite0's inner channels removed with a recovery epoch fell from 86.7% to 65.7% validation; on the
# Pareto front of searched networks (BENCHMARKS.md, accuracy against latency) 96 px and 112 px inputs
# were 2.27x and 1.64x faster than the 128 px recipe at higher accuracy. Down to this share of the side:
MIN_LATENCY_SCALE = 0.5
# Latency at batch 1 against the input's side: it falls more slowly than the pixels (per-call costs
# do not shrink). Measured in bench/auto.py latency300 (a266191): 160 -> 112 px took int8 from 1.97
# to 1.33 ms (0.676x for 0.49x the pixels; batch 64: 0.52x), side^1.10; on the Pareto front 128 ->
# 96 px was 1.5x, side^1.41. The smaller exponent, so that the estimate errs towards the faster size:
LATENCY_SIDE_EXPONENT = 1.1
# A latency judged against a bound: the fastest of 5 rounds this far apart, the machine's quiet speed.
# This 2-core machine has slow spells of 0.3-7.8 s with nothing else on its cores (bench/turns.py:
# one model sampled every 0.29 s for 2 minutes, 22% of samples over 1.2x the median). Replayed on
# those samples, the median of 5 rounds 0.3 s apart read over 1.2x the typical time in 18.5% of
# windows, the fastest of 5 rounds 1.2 s apart in 3.9% (its 90th percentile 1.06x), reading 0.92x.
ROUND_GAP_S = 1.0


def round_gap(budget_s: float) -> float:
    """ROUND_GAP_S, less for budgets under 10 minutes: the gaps of one timing stay under 1% of it."""
    return min(ROUND_GAP_S, budget_s / 600)


def search_space(n_train: int) -> dict:
    """The default space, with batch sizes that leave a small set several steps per epoch."""
    space = dict(DEFAULT_SPACE)
    batches = [b for b in (32, 64, 128, 256, 512) if b <= max(32, n_train // 4)][-3:]
    space["train.batch_size"] = {"type": "categorical", "choices": batches}
    return space


def search(base: RunConfig, folder: Path, seconds: float, n_train: int, command: str, resume: bool) -> dict:
    """The head search; its trials end by `seconds` from now: none starts when the median trial so
    far would cross it (the first one runs whatever it takes: it fills the feature cache; CIFAR-10
    at 30 minutes: trials started until the share's end overran it by 23 s, which left test-time
    flips no time). The best trial is not scored on the test split here."""
    began = time.monotonic()
    if resume and (folder / "base.yaml").is_file():
        summary = run_search(None, None, folder, MAX_TRIALS, seconds, resume=True, command=command, test=False)
    else:
        summary = run_search(base, search_space(n_train), folder, MAX_TRIALS, seconds, command=command, test=False,
                             settings=SearchSettings(seed=base.train.seed, end_by_deadline=True))
    if summary["run"] is None:
        raise GraftError(f"{folder}: no search trial completed, so there is no model to ship; a larger "
                         "--budget gives the search time for one")
    return {"run": summary["run"], "val_acc": summary["val_accuracy"], "best_trial": summary["best_trial"],
            "trials": summary["trials_done"], "params": summary["params"], "stopped": summary["stopped"],
            "seconds": round(time.monotonic() - began, 1)}


def finetune(best_run: str, folder: Path, epochs: int, deadline: float, resume: bool) -> dict:
    """The best trial's model with its backbone unfrozen for `epochs` (stage 2 alone, from the
    trial's weights); ends early at the epoch that would cross `deadline`."""
    run, stop = _trained(folder / "finetune", best_run, {
        "out": str(folder), "name": "finetune", "train.init": str(best_run), "train.epochs": 0,
        "finetune.epochs": epochs, **finetune_settings(epochs, _group_count(best_run))}, deadline, resume)
    return _outcome(run, stop)


def resolution_step(tuned: str, folder: Path, size: int, epochs: int, deadline: float, resume: bool) -> dict:
    """The fine-tuned run going on at `size` px for `epochs` (AUTO/resolution-SIZE), the same groups
    and rates as its own fine-tuning (`graft finetune --init RUN --image-size SIZE --epochs 0` by
    hand; its config carries those), with the augmentation for `epochs`; ends early at the epoch that
    would cross `deadline`. A head that flattens the feature map cannot take another input size:
    {"skipped": why}."""
    if resolve(Path(tuned) / "config.yaml").head.pool == "flatten":
        return {"skipped": "the head flattens the backbone's feature map, whose size is the input's"}
    run, stop = _trained(folder / f"resolution-{size}", tuned, {
        "out": str(folder), "name": f"resolution-{size}", "train.init": str(tuned), "backbone.image_size": size,
        "train.epochs": 0, "finetune.epochs": epochs, "finetune.augment": augment_for(epochs)}, deadline, resume)
    return {**_outcome(run, stop), "image_size": size}


def ensemble_members(first: str | Path, folder: Path, extra: int, deadline: float, resume: bool) -> dict:
    """`extra` more models fine-tuned as the `first` was (its config, the same head to start from)
    with seeds first + 1, + 2, ...: AUTO/finetune-2, ... A member that the `deadline` stops before
    its last epoch is left out (an under-trained member would pull the average down).
    Returns {"runs", "val_accs", "why"}."""
    seed = resolve(Path(first) / "config.yaml").train.seed
    runs, accs, why = [], [], None
    for k in range(2, extra + 2):
        run, stop = _trained(folder / f"finetune-{k}", first, {"name": f"finetune-{k}", "train.seed": seed + k - 1},
                             deadline, resume)
        if stop.stopped:
            why = f"member {k} stopped at the deadline before its last epoch: left out"
            note("ensemble", why)
            break
        runs.append(str(run))
        accs.append(_outcome(run, stop)["val_acc"])
    return {"runs": runs, "val_accs": accs, "why": why}


def _trained(run: Path, source: str | Path, overrides: dict, deadline: float, resume: bool,
             callbacks=lambda: []) -> tuple[Path, StopAtDeadline]:
    """(`run`'s folder, its deadline callback): `run` trained from `source`'s config with `overrides`,
    ending at the epoch that would cross `deadline`; on resume a finished `run` is kept and an
    unfinished one goes on from its last checkpoint. `callbacks()`: more of them, made only when
    something is trained (a teacher is loaded only then)."""
    stop = StopAtDeadline(deadline)
    if resume and (run / "model.safetensors").is_file():
        return run, stop
    if resume and (run / "config.yaml").is_file():
        return train(None, resume=run, callbacks=[*callbacks(), stop], test=False).run_dir, stop
    cfg = resolve(Path(source) / "config.yaml", overrides)
    return train(cfg, callbacks=[*callbacks(), stop], test=False).run_dir, stop


def _outcome(run: Path, stop: StopAtDeadline) -> dict:
    """A fine-tuning run's {"run", "val_acc" (at its saved epoch; its stage-1 rows when it has no
    stage 2), "epochs_run", "stopped_at_deadline"}, from one read of its history."""
    rows = _history(run)
    tuning = [r for r in rows if r.get("stage") == "fine-tuning"]
    return {"run": str(run), "val_acc": saved_val_acc(resolve(run / "config.yaml"), tuning or rows),
            "epochs_run": len(tuning), "stopped_at_deadline": stop.stopped}


def measure_ensemble(runs: list[str], first: dict, folder: Path) -> dict:
    """The members' fp32 and int8 ONNX models merged into one file each (export.merge: averaged
    probabilities), `first`: the first member's models as measure gave them. Returns
    {"ensemble-fp32": {...}, "ensemble-int8": {...}} as measure's entries, with the members' runs;
    int8 only when every member's quantization succeeded."""
    from ..export.merge import merge_onnx
    from ..export.runtime import measure_latency
    every = [first, *(measure(r) for r in runs[1:])]
    paths = {"fp32": [Path(m["fp32"]["model"]) for m in every]}
    if all("error" not in m["int8"] for m in every):
        paths["int8"] = [Path(m["int8"]["model"]) for m in every]
    folder.mkdir(parents=True, exist_ok=True)
    # every runtime reads preprocess.json beside the model it opens: the first member's, naming them all
    pre = json.loads((Path(runs[0]) / "export" / "preprocess.json").read_text())
    atomic_write_json(folder / "preprocess.json", {**pre, "ensemble_members": [str(r) for r in runs]})
    out = {}
    for kind, members in paths.items():
        path = merge_onnx(members, folder / ("model.onnx" if kind == "fp32" else "model.int8.onnx"))
        out[f"ensemble-{kind}"] = {"model": str(path), "int8": kind == "int8", "members": [str(r) for r in runs],
                                   "val_acc": round(_val_accuracy(runs[0], path), 4),
                                   "latency_ms": round(measure_latency(path, batch_size=1)["median_ms"], 4),
                                   "size_mb": round(path.stat().st_size / 1e6, 4)}
    return out


def distillation_needed(models: dict, choice: dict, max_latency_ms: float | None) -> str | None:
    """Why one model should learn from the ensemble (it would ship but for --max-latency-ms, and a
    single model meets the bound), or None."""
    if max_latency_ms is None or not choice["meets"] or choice["model"].startswith("ensemble"):
        return None
    free = choose(models, None)
    if not free["model"].startswith("ensemble"):
        return None
    return (f"the ensemble ({free['model']}, validation accuracy {models[free['model']]['val_acc']:.4f}) would ship but "
            f"takes {models[free['model']]['latency_ms']:.3g} ms, over --max-latency-ms {max_latency_ms:g}")


def distill_ensemble(members: list[str], folder: Path, epochs: int, deadline: float, resume: bool) -> dict:
    """One model taught by the ensemble of `members`: the first member fine-tuned on for `epochs` as
    the members were, its loss mixed with the ensemble's softened class probabilities on every batch
    (Hinton et al.'s distillation, compress.teach with the teacher in the loop: T 4, alpha 0.7 as
    `graft distill`'s defaults). AUTO/distilled, from AUTO/ensemble-teacher (an unscored ensemble
    folder). Returns {"run", "val_acc", "epochs_run", "stopped_at_deadline", "teacher"}."""
    from ..compress.distill import DistillSettings
    from ..compress.teach import RunTeacher, TeacherInLoop
    from ..ensemble import save_unscored
    from ..predictor import ENSEMBLE_FILE
    s = DistillSettings()
    teacher_dir, run = folder / "ensemble-teacher", folder / "distilled"
    if not (teacher_dir / ENSEMBLE_FILE).is_file():
        save_unscored(members, teacher_dir)
    spec = get_spec(resolve(Path(members[0]) / "config.yaml").backbone.name)   # the student's normalisation
    run, stop = _trained(run, members[0], {
        "name": run.name, "train.init": str(members[0]), "train.epochs": 0, "finetune.epochs": epochs,
        "train.cache_features": False, "finetune.augment": augment_for(epochs)}, deadline, resume,
        lambda: [TeacherInLoop(RunTeacher(teacher_dir), spec.mean, spec.std, s.temperature, s.alpha)])
    return {**_outcome(run, stop), "teacher": str(teacher_dir)}


def _val_accuracy(run: str | Path, model: str | Path, flip: bool = False) -> float:
    """Validation accuracy of an exported model with the run's preprocessing (`flip`: each image's
    logits averaged with its mirror's, as `preprocess.json`'s flip_average asks of every runtime)."""
    from ..export.control import Validation
    from ..export.quantize import fp32_model
    spec, cfg, _, pre = fp32_model(run)
    val = Validation.of_run(cfg, spec, pre, Path(run))
    val.flip = flip
    return val.accuracy(Path(model))


def finetune_kept(tuned_acc: float, head_acc: float, n_val: int) -> tuple[bool, float]:
    """(keep the fine-tuned model, the margin): kept unless its validation accuracy falls more than
    one standard error of the head's below it. The head's score is the best of every search trial
    on the same validation images, so it is optimistic, the more so the fewer the images: on 100
    per class of CIFAR-10 (100 validation images) fine-tuning tied the head at 83% validation and
    scored 79.4% test against the head's 73.2% (bench/auto.py's ensemble100, 2026-12-06)."""
    margin = (head_acc * (1 - head_acc) / max(n_val, 1)) ** 0.5
    return tuned_acc >= head_acc - margin, margin


def top_groups(n_groups: int) -> int:
    """How many of a backbone's `n_groups` groups, from the top, fine-tuning trains."""
    return max(1, round(FINETUNE_TOP_SHARE * n_groups))


def finetune_settings(epochs: int, n_groups: int) -> dict:
    """The config overrides of auto's fine-tuning run of `epochs` on a backbone of `n_groups` groups
    (the probe times its steps with the same groups trained)."""
    return {**FINETUNE_SETTINGS, "finetune.unfreeze": f"top:{top_groups(n_groups)}",
            "finetune.augment": augment_for(epochs)}


def augment_for(epochs: int) -> str:
    """Fine-tuning's augmentation for a schedule of `epochs` (RANDAUGMENT_FROM)."""
    return "randaugment" if epochs >= RANDAUGMENT_FROM else "flip"


def _group_count(run: str | Path) -> int:
    from ..model import load_model
    from ..train.finetune import backbone_groups
    model, _ = load_model(run)
    return len(backbone_groups(model))


def measure(run: str | Path, val_acc: float | None = None) -> dict:
    """fp32 and int8 ONNX models of the run: {"fp32": {...}, "int8": {...}} with validation accuracy
    (`val_acc`, else the run's saved epoch's), latency at batch 1 (median, ms) and size; int8's
    quantization may fail, recorded as its error."""
    run = Path(run)
    cfg = resolve(run / "config.yaml")
    val_acc = saved_val_acc(cfg, _history(run)) if val_acc is None else val_acc
    out = {"fp32": {**measure_run(run, int8=False), "val_acc": val_acc}}
    try:
        out["int8"] = measure_run(run, int8=True)
        out["int8"]["val_acc"] = out["int8"].pop("val_acc_int8")
    except (GraftError, RuntimeError, ValueError) as e:   # ORT's quantizer raises its own types
        out["int8"] = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    return out


def prune_amount(latency_ms: float, bound_ms: float) -> float:
    """The share of channels to remove for `latency_ms` to fall under `bound_ms`. Pruning only the
    channels inside blocks (an inverted residual's expansion), a block's work falls about in
    proportion to the channels kept (Lite0: MACs 0.64x at 30%, 0.45x at 50%; BENCHMARKS.md,
    pruning); aimed PRUNE_MARGIN below the bound, since a run's fixed costs do not shrink."""
    return max(0.05, 1 - bound_ms / (PRUNE_MARGIN * latency_ms))


def timed_together(*groups: dict, gap: float = ROUND_GAP_S) -> list[dict]:
    """The groups of models (as measure's) with every measured model's latency taken again, all of
    them in turns in a fresh process (export.runtime.retime_apart: TURN_ROUNDS rounds `gap` s
    apart, each model's median of 20 runs in every round): latency_ms the fastest round, beside
    latency_ms_median and the first timing, latency_ms_once. A bound is decided, and one model
    called faster than another, on these: one median of 20 runs is one moment of a shared machine,
    and the same int8 export timed 1.55 to 3.13 ms in the runs of bench/auto.py latency300."""
    import statistics
    from ..export.runtime import retime_apart
    paths = {f"{i}/{k}": m["model"] for i, group in enumerate(groups) for k, m in group.items()
             if "error" not in m and "model" in m}
    rounds = retime_apart(paths, gap=gap) if paths else {}

    def retimed(m: dict, t: list[float] | None) -> dict:
        return m if t is None else {**m, "latency_ms": round(min(t), 4),
                                    "latency_ms_median": round(statistics.median(t), 4),
                                    "latency_ms_once": m.get("latency_ms_once", m["latency_ms"])}
    return [{k: retimed(m, rounds.get(f"{i}/{k}")) for k, m in group.items()} for i, group in enumerate(groups)]


def fastest_ms(models: dict) -> float:
    """The lowest batch-1 latency among `models` (as measure's) that were measured."""
    return min(m["latency_ms"] for m in models.values() if "error" not in m)


def _smallest_size(size: int) -> int:
    return max(64, int(MIN_LATENCY_SCALE * size))


def smaller_size(size: int, latency_ms: float, bound_ms: float) -> int | None:
    """The largest input in 16-px steps below `size` whose latency, taken to scale with the side to
    the LATENCY_SIDE_EXPONENT, falls PRUNE_MARGIN under `bound_ms`; None when that is below
    MIN_LATENCY_SCALE of the side (or 64 px)."""
    new = int(size * (bound_ms / (PRUNE_MARGIN * latency_ms)) ** (1 / LATENCY_SIDE_EXPONENT)) // 16 * 16
    return new if _smallest_size(size) <= new < size else None


def smaller_input(exported: dict, bound_ms: float, folder: Path, left: float, epoch_s: float,
                  resume: bool, gap: float = ROUND_GAP_S) -> dict:
    """The exported run fine-tuned on for one epoch at smaller_size (AUTO/resolution-SIZE, as the
    resolution step makes it) when `left` seconds hold that epoch (`epoch_s` at the run's own size,
    scaled by the pixels), then both of its models measured. {"resized": False, "why"} when no size
    fits the rule, the head cannot take another size, or there is no time; else {"resized": True,
    "run", "image_size", "val_acc", "epochs_run", "models", "baseline_ms"}: latencies timed in turns
    with the exported models (timed_together), baseline_ms the fastest of those in the same turns."""
    cfg = resolve(Path(exported["run"]) / "config.yaml")
    size = cfg.backbone.image_size
    fastest = fastest_ms(exported["models"])
    new = smaller_size(size, fastest, bound_ms)
    if new is None:
        return {"resized": False, "why": f"no smaller input down to {_smallest_size(size)} px is "
                                         f"estimated to bring {fastest:.3g} ms under {bound_ms:g} ms"}
    need = 1.1 * epoch_s * (new / size) ** 2   # training steps do scale with the pixels
    if left < need:
        return {"resized": False, "why": f"an epoch at {new} px (about {shown(need)}) does not fit the {shown(left)} left"}
    r = resolution_step(exported["run"], folder, new, 1, time.monotonic() + left, resume)
    if "skipped" in r:
        return {"resized": False, "why": r["skipped"]}
    before, models = timed_together(exported["models"], measure(r["run"], r["val_acc"]), gap=gap)
    return {"resized": True, **r, "models": models, "baseline_ms": fastest_ms(before)}


def prune_for_latency(exported: dict, bound_ms: float, folder: Path, left: float, epoch_s: float,
                      seed: int, resume: bool, gap: float = ROUND_GAP_S) -> dict:
    """The exported run with channels removed (`graft prune`, structured, inside blocks only) until
    its estimated latency meets `bound_ms`, with one recovery epoch when `left` seconds hold it
    (`epoch_s`: the plan's fine-tuning epoch, reserved by the plan when a bound is given),
    BatchNorm recalibration only otherwise; then both of its models measured. Returns {"pruned":
    False, "why"} when the bound asks too much or no time is left, else the pruned run's "models"
    (as measure's, timed in turns with the exported ones: "baseline_ms" the fastest of those) with
    "run", "amount", "recovery_epochs", validation accuracy before and after and "macs_ratio"."""
    import shutil
    from ..compress.prune import PruneSettings, prune_run
    from ..train.checkpoint import FILE as CHECKPOINT
    fastest = fastest_ms(exported["models"])
    amount = round(prune_amount(fastest, bound_ms), 3)
    if amount > MAX_PRUNE:
        return {"pruned": False, "amount": amount,
                "why": f"not pruned: {fastest:.3g} ms to {bound_ms:g} ms would take removing about {amount:.0%} of "
                       f"the channels, more than the {MAX_PRUNE:.0%} a network recovers from"}
    if left <= 0:
        return {"pruned": False, "amount": amount, "why": f"not pruned: it would remove {amount:.0%} of the "
                "channels, and the budget has no time left for it (a larger --budget has)"}
    epochs = 1 if left >= 1.1 * epoch_s else 0   # the pruning steps' BatchNorm recalibrations besides
    out = folder / "pruned"
    if resume and (out / "prune.json").is_file():    # it finished; the kill came while measuring
        run = out
    elif resume and (out / CHECKPOINT).is_file():
        run = prune_run(None, None, resume=out, test=False)
    else:
        shutil.rmtree(out, ignore_errors=True)   # an attempt killed before its first checkpoint
        settings = PruneSettings(amount=amount, finetune_epochs=epochs, channels="inner", seed=seed)
        run = prune_run(exported["run"], settings, out=str(folder), name="pruned", test=False)
    record = json.loads((run / "prune.json").read_text())
    before, pruned = timed_together(exported["models"], measure(run, record["after"]["val_acc"]), gap=gap)
    return {"pruned": True, "run": str(run), "models": pruned, "baseline_ms": fastest_ms(before),
            "amount": amount, "recovery_epochs": epochs,
            "val_acc_before": record["before"]["val_acc"], "val_acc_after": record["after"]["val_acc"],
            "macs_ratio": round(record["after"]["macs"] / max(record["before"]["macs"], 1), 3)}


def _history(run: Path) -> list[dict]:
    from ..run import read_history
    return read_history(run)


def flip_accuracy(run: str | Path, model: str | Path) -> float:
    """Validation accuracy of an exported model averaging each image's logits with its mirror's
    (test-time augmentation, as `preprocess.json`'s flip_average asks of every runtime)."""
    return _val_accuracy(run, model, flip=True)


def tta(model: dict, run: str | Path, left: float, cost: float, max_latency_ms: float | None) -> dict:
    """Flip test-time augmentation for the chosen `model`, tried when the `left` seconds hold its
    `cost` (two validation passes; the plan's rate with a margin) and the latency bound room for
    twice the latency; used from MIN_TTA_GAIN of validation accuracy."""
    if left < cost:
        return {"used": False, "why": f"test-time flips not tried: {shown(left)} left, they need about {shown(cost)}"}
    if max_latency_ms is not None and 2 * model["latency_ms"] > max_latency_ms:
        return {"used": False, "why": "test-time flips not tried: twice the latency would exceed --max-latency-ms"}
    flipped = flip_accuracy(run, model["model"])
    used = flipped >= model["val_acc"] + MIN_TTA_GAIN
    return {"used": used, "val_acc": flipped, "latency_ms": 2 * model["latency_ms"],
            "why": f"test-time flips {'used' if used else 'not used'}: validation accuracy {flipped:.4f} "
                   f"against {model['val_acc']:.4f} without, at twice the latency"}


def choose(models: dict, max_latency_ms: float | None) -> dict:
    """The model to ship: the fastest within MAX_INT8_DROP of the most accurate (int8, when it keeps
    fp32's accuracy, being the smaller and usually the faster; of two as fast, the smaller); only
    models within `max_latency_ms` count; when none is, the fastest ships and `meets` is False."""
    ok = {k: m for k, m in models.items() if "error" not in m and m.get("val_acc") is not None}
    if not ok:
        raise GraftError("no exported model could be measured")
    within = {k: m for k, m in ok.items() if max_latency_ms is None or m["latency_ms"] <= max_latency_ms}
    if not within:
        name = _fastest(ok)
        return {"model": name, "meets": False,
                "why": f"no model meets --max-latency-ms {max_latency_ms:g}: the fastest, {name}, takes "
                       f"{ok[name]['latency_ms']:.3g} ms; it ships anyway"}
    best = max(m["val_acc"] for m in within.values())
    good = {k: m for k, m in within.items() if m["val_acc"] >= best - MAX_INT8_DROP}
    name = _fastest(good)
    others = "; ".join(f"{k} {m['val_acc']:.4f}, {m['latency_ms']:.3g} ms" if "error" not in m else f"{k} failed"
                       for k, m in models.items() if k != name)
    why = (f"{name}: validation accuracy {ok[name]['val_acc']:.4f}, {ok[name]['latency_ms']:.3g} ms at batch 1"
           + (f" (within {max_latency_ms:g} ms)" if max_latency_ms is not None else "") + (f"; {others}" if others else ""))
    return {"model": name, "meets": True, "why": why}


def _fastest(models: dict) -> str:
    """The fastest model's name; latencies within LATENCY_TIE of each other are one speed (the next
    measurement may order them the other way), and of those the smaller file wins."""
    fastest = min(m["latency_ms"] for m in models.values())
    return min((k for k, m in models.items() if m["latency_ms"] <= LATENCY_TIE * fastest),
               key=lambda k: (models[k].get("size_mb", 0.0), models[k]["latency_ms"]))


def test_score(model_path: str | Path, run: str | Path) -> dict | None:
    """The shipped file's metrics on the run's test split (accuracy with its 95% interval, per class);
    None when the split is not readable."""
    from ..export.quantize import held_out_images
    from ..export.runtime import OnnxClassifier
    from ..metrics import classification_metrics
    from ..model import load_model
    _, spec = load_model(run)
    images = held_out_images(resolve(Path(run) / "config.yaml"), spec, "test")
    if images is None:
        return None
    logits = OnnxClassifier(model_path).logits([im.numpy() for im in images.images])
    metrics = classification_metrics(torch.from_numpy(logits), images.labels, list(spec.classes))
    metrics.pop("confusion", None)
    return metrics


def base_config(cfg: RunConfig, chosen: dict, data: dict, size: int | None = None) -> RunConfig:
    """The probe's backbone and the plan's input `size` (the probe's by default) on the user's base
    config; imbalanced classes weigh the loss, and unreadable files (the look reads only a sample) are
    left out and listed in each run's skipped.txt rather than failing every trial."""
    weights = "balanced" if data["imbalance"] > IMBALANCED else cfg.train.class_weights
    return dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, name=chosen["backbone"], image_size=size or chosen["image_size"]),
        train=dataclasses.replace(cfg.train, class_weights=weights),
        data=dataclasses.replace(cfg.data, skip_bad=True))


def note(stage: str, message: str) -> None:
    log(f"auto: {stage}: {message}")
