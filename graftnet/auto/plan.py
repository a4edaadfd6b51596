"""What `graft auto` finds in the data before it spends anything, and the plan it makes from that and
from the probe's measured speeds: each stage with the seconds it is expected to take on this machine.

The data is opened and split exactly as `graft train` opens and splits it (data.labels.open_data,
data.images.config_splits), so the counts printed here are the run's counts. Images are read, not
decoded, for the checks: sizes from a sample's headers, duplicates by the hash of every file's bytes.
"""
from __future__ import annotations

import hashlib
import io
import statistics
from collections import Counter

from ..config import RunConfig
from ..data.images import config_splits
from ..data.labels import open_data
from ..errors import DataError
from ..progress import bar
from .budget import shown

SIZE_SAMPLE = 64          # images whose headers give the size range
HASH_LIMIT = 20_000       # files hashed per split for the duplicate check (a sample beyond that)
IMBALANCED = 3.0          # largest / smallest class above this: say so, and balance the loss
# seconds that do not scale with the data: opening runs, ONNX export and quantization, writing files
# (export: 5 s of it time the models in turns, in a child process, rounds up to a second apart)
FIXED = {"search": 5.0, "finetune": 3.0, "export": 10.0, "deploy": 2.0}
# the ONNX export (torch.export) and int8 quantization grow with the network: seconds per million
# parameters on a 2-core CPU (EfficientNet-Lite0, 3.4 M, at 160 px: its export stage took 39 s with
# 400 validation images, where a fixed 12 s had been planned)
EXPORT_S_PER_M = 6.0
# Fine-tuning moves to a smaller input, down to this share of the probe's size, when that lets it run
# a whole epoch. CIFAR-10, EfficientNet-Lite0, validation accuracy (bench/search.py's pareto_ft): one
# epoch at 128 px (0.8 of 160), from the paper recipe's head, 87.1%: level with the best searched
# frozen heads at 160 px (86.3-87.4%) before any head search at 128 px; at 96 px (0.6) 84.4%, below
MIN_FINETUNE_SCALE = 0.75
# Fine-tuning's share holds its epochs this much longer than estimated: the probe times two steps on
# a sample, the epoch adds the data pipeline and whatever else the machine runs (CIFAR-10, Lite0 at
# 144 px: epochs took 1.06x and 1.16x the estimate in two runs; with 1.05 the second took the time
# of test-time flips). The stage counts its epochs again from the time actually left, on the plain
# estimate, so a search ending a few seconds late does not cost the only epoch either.
FINETUNE_MARGIN = 1.15
# When fine-tuning has all its epochs (max_finetune_epochs) and time is left, more epochs of one
# model are not what the time buys: a second (third) model, fine-tuned alike from another seed,
# joins it in an ensemble of averaged probabilities. On CIFAR-10 ensembles of fine-tuned Lite0 and
# Lite1 models gained 0.3-0.6 points over their best member (BENCHMARKS.md, ensembles); the export
# ships one only when it beats the best single model by the 0.5 points doubling the latency must buy.
# With a latency bound the ensemble may win and still be too slow: the plan then also reserves one
# model's fine-tuning taught by the ensemble (distillation, the members scoring every batch).
MAX_MEMBERS = 3
# A resolution step (fastai's progressive resizing): when fine-tuning has all its epochs and no second
# member fits, the fine-tuned model goes on at about RESOLUTION_SCALE times the input (16-pixel steps,
# at most the weights' native input) for RESOLUTION_EPOCHS at the same rates; it is kept only when
# validation gains what the larger input's latency must buy (stages.MIN_STEP_GAIN). CIFAR-10
# (BENCHMARKS.md, input size): Lite0 128 -> 160 -> 192 px gained about a third of a point a stage,
# Lite1 160 -> 192 px 0.99 points; a restart at a new size costs validation accuracy first, repaid by
# the third epoch (so three, not one: one flip epoch at 192 px added nothing on validation); Lite0
# from 192 px to its native 224 lost 0.14. Without a latency bound only: the larger input is slower.
RESOLUTION_EPOCHS = 3
RESOLUTION_SCALE = 1.2


def look(cfg: RunConfig) -> dict:
    """Counts per split and class, imbalance, image sizes, unreadable files and duplicates across
    splits, as plain numbers (they go to decisions.json) with `notes`, the lines worth a warning."""
    source = open_data(cfg.data, cfg.cache_dir)
    splits = config_splits(source, cfg.data)
    if not splits["val"]:
        raise DataError(f"{source.location}: no validation images; `graft auto` chooses on the validation "
                        "split (set data.val_fraction > 0 or give the data more images)")
    per_class = Counter(label for _, label in splits["train"])
    counts = [per_class.get(i, 0) for i in range(len(source.classes))]
    ratio = max(counts) / max(min(counts), 1)
    sides, unreadable = _sizes(source, splits["train"])
    unreadable = sorted(set(unreadable) | set(source.bad))
    dups = _duplicates(source, splits)
    notes = []
    if ratio > IMBALANCED:
        notes.append(f"classes imbalanced: {max(counts)} vs {min(counts)} training images ({ratio:.1f}:1); "
                     "the loss weighs classes by inverse frequency (train.class_weights=balanced)")
    if unreadable:
        notes.append(f"{len(unreadable)} unreadable file(s) among those read, left out (data.skip_bad): "
                     + ", ".join(unreadable[:3]) + (", ..." if len(unreadable) > 3 else ""))
    if dups["pairs"]:
        notes.append(f"{dups['pairs']} image(s) appear in more than one split ({', '.join(dups['between'])}): "
                     "the validation and test scores are optimistic by that much")
    return {"location": source.location, "classes": list(source.classes),
            "counts": {k: len(v) for k, v in splits.items()}, "per_class": dict(zip(source.classes, counts)),
            "imbalance": round(ratio, 3), "image_sides": sides, "unreadable": unreadable[:100],
            "unreadable_count": len(unreadable), "duplicates": dups, "notes": notes}


def _sizes(source, train: list) -> tuple[dict, list[str]]:
    """Smallest, median and largest side of a spread sample of training images (headers only)."""
    from PIL import Image
    step = max(1, len(train) // SIZE_SAMPLE)
    found, bad = [], []
    for key, _ in train[::step][:SIZE_SAMPLE]:
        try:
            data = source.read(key)
            if hasattr(data, "shape"):   # an in-memory array (CIFAR archives): H x W x C
                found.append(min(data.shape[:2]))
                continue
            with Image.open(io.BytesIO(data)) as im:
                found.append(min(im.size))
        except (DataError, OSError, ValueError):
            bad.append(source.describe(key))
    if not found:
        return {"min": None, "median": None, "max": None, "sampled": 0}, bad
    return {"min": min(found), "median": int(statistics.median(found)), "max": max(found),
            "sampled": len(found)}, bad


def _duplicates(source, splits: dict) -> dict:
    """Files with the same bytes in two splits: {"pairs", "between", "hashed"}."""
    seen: dict[str, str] = {}
    pairs, between, hashed = 0, set(), 0
    total = sum(min(len(v), HASH_LIMIT) for v in splits.values())
    with bar(total, "checking for duplicates") as advance:
        for name, samples in splits.items():
            step = max(1, len(samples) // HASH_LIMIT)
            for key, _ in samples[::step][:HASH_LIMIT]:
                try:
                    data = source.read(key)
                except DataError:
                    continue
                digest = hashlib.blake2b(data.tobytes() if hasattr(data, "tobytes") else data,
                                         digest_size=16).hexdigest()
                hashed += 1
                advance()
                other = seen.setdefault(digest, name)
                if other != name:
                    pairs += 1
                    between.add(f"{other}/{name}")
    return {"pairs": pairs, "between": sorted(between), "hashed": hashed}


def estimates(data: dict, probe: dict, size: int | None = None) -> dict:
    """Seconds per unit of work on this machine, from the probe's measured rates: decoding every
    split, the backbone pass over training and validation images, one fine-tuning epoch, the export
    with int8 (test-time flips included), and the test pass. At another input `size` than the probe's
    chosen one, the network's rates scale with the pixels (a convolutional network's work does)."""
    n = data["counts"]
    scale = (probe["chosen"]["image_size"] / size) ** 2 if size else 1.0
    infer, train_rate = probe["images_per_s"] * scale, probe["train_images_per_s"] * scale
    decode = probe["decode_images_per_s"]
    every = sum(n.values())
    tta = 2 * 1.5 * n["val"] / infer   # test-time flips: two validation passes, with an int8 margin
    return {"decode": every / decode,
            "features": (n["train"] + n["val"]) / infer,   # the test split's pass is the deploy stage's
            "teacher_epoch": n["train"] / infer,           # one ensemble member scoring an epoch's images
            "finetune_epoch": n["train"] / train_rate + n["val"] / infer,
            # export checks 32 images, int8 calibrates on 256 and scores the validation split
            "export": FIXED["export"] + EXPORT_S_PER_M * probe["chosen"].get("params_m", 0.0)
            + (32 + min(256, n["train"]) + n["val"]) / infer + tta,
            "tta": tta,
            "test": n["test"] / infer + FIXED["deploy"]}


def smaller_sizes(size: int) -> list[int]:
    """Input sizes below the probe's choice that fine-tuning may move to: 16-pixel steps down to
    MIN_FINETUNE_SCALE of it."""
    return [s for s in range(size - 16, 0, -16) if s >= MIN_FINETUNE_SCALE * size]


def larger_size(size: int, native: int | None) -> int | None:
    """The resolution step's input after `size`: RESOLUTION_SCALE of it in 16-pixel steps, at most
    the weights' `native` input; None when that is no larger."""
    big = min(16 * round(RESOLUTION_SCALE * size / 16), native or size)
    return big if big > size else None


def make_plan(data: dict, probe: dict, left: float, max_finetune_epochs: int = 10, prune: bool = False) -> dict:
    """Each stage's share of the `left` seconds: the search gets the backbone pass and at least a third
    of what follows it; fine-tuning gets whole epochs of the rest, or is skipped with its reason.
    When not one epoch fits at the probe's input size, the largest smaller size (down to
    MIN_FINETUNE_SCALE of it) where one does is taken for the whole run, search included.
    `prune` (a latency bound was given): pruning's recovery epoch and second export are reserved
    when they take at most a third of what the backbone pass leaves (unused when int8 meets the bound)."""
    size = probe["chosen"]["image_size"]
    plan = _plan_at(data, probe, left, size, max_finetune_epochs, prune)
    if plan["finetune_epochs"] or plan["search_s"] <= 0:
        return plan
    for smaller in smaller_sizes(size):
        alt = _plan_at(data, probe, left, smaller, max_finetune_epochs, prune)
        if alt["finetune_epochs"]:
            alt["size_reason"] = (f"{smaller} px instead of the probe's {size}: an epoch there fits "
                                  f"({shown(alt['estimates']['finetune_epoch'])}), at {size} px it would not "
                                  f"({shown(plan['estimates']['finetune_epoch'])}); fine-tuning gains more than "
                                  "the larger input")
            return alt
    return plan


def _plan_at(data: dict, probe: dict, left: float, size: int, max_finetune_epochs: int, prune: bool) -> dict:
    est = estimates(data, probe, size)
    reserve = est["export"] + est["test"]
    first = est["decode"] + est["features"] + FIXED["search"]   # the first trial fills the feature cache
    room = left - reserve - first
    prune_s, prune_reason = 0.0, None
    if prune:
        need = FIXED["finetune"] + est["finetune_epoch"] + est["export"]
        if need <= room / 3:
            prune_s, room, reserve = need, room - need, reserve + need
        else:
            prune_reason = (f"pruning's recovery epoch and export (about {shown(need)}) would take more than a "
                            "third of the budget after the backbone pass: not reserved; pruning, if the bound "
                            "needs it, gets what is left")
    plan = {"image_size": size, "size_reason": None, "estimates": {k: round(v, 2) for k, v in est.items()},
            "left_s": round(left, 1), "reserve_s": round(reserve, 1), "prune_s": round(prune_s, 1),
            "prune_reason": prune_reason, "members": 1, "ensemble_s": 0.0, "ensemble_reason": None,
            "distill_s": 0.0, "resolution_size": None, "resolution_s": 0.0, "resolution_reason": None}
    if room <= 0:
        plan.update(search_s=max(left - reserve, 0.0), finetune_epochs=0, finetune_s=0.0,
                    finetune_reason=f"no time left after the backbone pass ({shown(first)}) and the export "
                                    f"({shown(reserve)})")
        return plan
    epoch = est["finetune_epoch"]
    epochs = min(max_finetune_epochs, int((2 / 3 * room - FIXED["finetune"]) // (FINETUNE_MARGIN * epoch)))
    if epochs < 1:
        plan.update(search_s=first + room, finetune_epochs=0, finetune_s=0.0,
                    finetune_reason=f"one fine-tuning epoch takes about {shown(epoch)}, more than two thirds "
                                    f"of the {shown(room)} left after the head search's backbone pass")
        return plan
    finetune = FIXED["finetune"] + epochs * epoch * FINETUNE_MARGIN
    members, member = 1, finetune + est["export"]   # another member: its fine-tuning and its export

    def distill(k: int) -> float:
        """With a latency bound: one model taught by the k members (their passes in every step) and its export."""
        return (FIXED["finetune"] + epochs * (epoch + k * est["teacher_epoch"]) * FINETUNE_MARGIN + est["export"]
                if prune else 0.0)
    while (epochs == max_finetune_epochs and members < MAX_MEMBERS
           and finetune + members * member + distill(members + 1) <= 2 / 3 * room):
        members += 1
    ensemble, distill_s = (members - 1) * member, distill(members) if members > 1 else 0.0
    step, step_s, extra, plan["resolution_reason"] = _resolution(data, probe, est, size, 2 / 3 * room - finetune,
                                                                  members, epochs == max_finetune_epochs, prune)
    # the larger model's export and test pass take longer: reserved with the export's
    reserve += extra
    plan.update(reserve_s=round(reserve, 1), resolution_size=step, resolution_s=step_s)
    plan.update(search_s=left - reserve - finetune - ensemble - distill_s - step_s, finetune_epochs=epochs,
                finetune_s=finetune, finetune_reason=f"{epochs} epoch(s) of about {shown(epoch)} fit in the budget",
                members=members, ensemble_s=ensemble, distill_s=distill_s,
                ensemble_reason=f"{members - 1} more model(s) fine-tuned alike from other seeds fit beside the "
                                f"first ({shown(member)} each)" if members > 1 else
                                "one model: " + ("its fine-tuning epochs take the time" if epochs < max_finetune_epochs
                                                 else "another member does not fit"))
    return plan


def _resolution(data: dict, probe: dict, est: dict, size: int, room: float, members: int, all_epochs: bool,
                bound: bool) -> tuple[int | None, float, float, str | None]:
    """(the step's input size or None, its fine-tuning seconds, the extra export and test seconds,
    why not / what): a resolution step fits in `room` after fine-tuning's own share."""
    if not all_epochs or members > 1:
        return None, 0.0, 0.0, ("no resolution step: " + ("fine-tuning's own epochs take the time" if not all_epochs
                                                          else "the ensemble's members take the time"))
    big = larger_size(size, probe["chosen"].get("native_size"))
    if big is None:
        return None, 0.0, 0.0, f"no resolution step: {size} px is the backbone's native input or above"
    if bound:
        return None, 0.0, 0.0, "no resolution step: a larger input is slower, and --max-latency-ms bounds the latency"
    at = estimates(data, probe, big)
    train_s = FIXED["finetune"] + RESOLUTION_EPOCHS * at["finetune_epoch"] * FINETUNE_MARGIN
    extra = (at["export"] - est["export"]) + (at["test"] - est["test"])
    if train_s + extra > room:
        return None, 0.0, 0.0, (f"no resolution step: {RESOLUTION_EPOCHS} epochs at {big} px and the larger export "
                                f"(about {shown(train_s + extra)}) do not fit")
    return big, train_s, extra, (f"{RESOLUTION_EPOCHS} more epochs at {big} px from the fine-tuned model "
                                 f"({shown(train_s)}); kept when validation gains 0.5 points")


def epochs_that_fit(plan: dict, left: float, teachers: int = 0) -> int:
    """The fine-tuning epochs (at most the planned ones) that `left` seconds hold when the stage
    starts, on the plain estimate: the plan's FINETUNE_MARGIN is what absorbs a late start.
    `teachers`: ensemble members scoring every batch (distillation)."""
    est = plan["estimates"]
    epoch = est["finetune_epoch"] + teachers * est.get("teacher_epoch", 0.0)
    return min(plan["finetune_epochs"], int((left - FIXED["finetune"]) // epoch))


def slice_to_fit(data: dict, plan: dict, share: float = 0.5, least: int = 10) -> int | None:
    """Images per class (data.max_per_class) that bring the backbone pass down to `share` of the time
    left after the export: fewer images trained on beat a plan that cannot finish. None when even
    `least` per class would not fit."""
    est = plan["estimates"]
    room = share * (plan["left_s"] - plan["reserve_s"]) - FIXED["search"]
    pass_s = est["decode"] + est["features"]
    largest = max(data["per_class"].values())
    cap = int(largest * room / pass_s) if room > 0 else 0
    return cap if cap >= least else None


def plan_rows(data: dict, probe: dict | None, plan: dict | None, budget_s: float) -> list[tuple]:
    """(stage, what, expected time) for the plan table."""
    n = data["counts"]
    rows = [("look", f"{len(data['classes'])} classes; train {n['train']}, val {n['val']}, test {n['test']}", "done")]
    if probe is None:
        return rows + [("probe", "frozen features of a sample per candidate backbone and size", "?")]
    chosen = probe["chosen"]
    rows.append(("probe", f"chose {chosen['backbone']} at {chosen['image_size']} px "
                          f"(sample accuracy {chosen['sample_acc']:.3f}, {chosen['images_per_s']:.0f} images/s)",
                 shown(probe["seconds"])))
    size = plan.get("image_size", chosen["image_size"])
    rows.append(("search", f"head and features on cached features (Optuna) at {size} px, best on validation"
                 + (f"; {plan['size_reason']}" if plan.get("size_reason") else ""), shown(plan["search_s"])))
    rows.append(("finetune", f"{plan['finetune_epochs']} epoch(s) of the backbone's top groups unfrozen" if plan["finetune_epochs"]
                 else f"skipped: {plan['finetune_reason']}", shown(plan["finetune_s"]) if plan["finetune_epochs"] else "-"))
    if plan.get("resolution_size"):
        rows.append(("resolution", plan["resolution_reason"], shown(plan["resolution_s"])))
    if plan.get("members", 1) > 1:
        rows.append(("ensemble", f"{plan['members'] - 1} more model(s) fine-tuned alike from other seeds; the "
                     "averaged ensemble ships if it beats the best one by 0.5 points", shown(plan["ensemble_s"])))
    if plan.get("distill_s"):
        rows.append(("distill", "only if the ensemble wins but misses --max-latency-ms: one model taught by it",
                     shown(plan["distill_s"])))
    rows.append(("export", "ONNX fp32 and int8, validation accuracy and latency measured", shown(plan["estimates"]["export"])))
    if plan.get("prune_s") or plan.get("prune_reason"):
        rows.append(("prune", "only if no model meets --max-latency-ms: channels removed, one recovery epoch"
                     if plan.get("prune_s") else f"only if no model meets --max-latency-ms; {plan['prune_reason']}",
                     shown(plan["prune_s"]) if plan.get("prune_s") else "-"))
    rows.append(("deploy", "test split scored once; model card, report, deployment folder", shown(plan["estimates"]["test"])))
    return rows


def print_plan(data: dict, probe: dict | None, plan: dict | None, budget_s: float, console) -> None:
    from rich.table import Table
    for note in data["notes"]:
        console.print(f"[yellow]data:[/] {note}", soft_wrap=True)
    sides = data["image_sides"]
    if sides["min"] is not None:
        console.print(f"data: image sides {sides['min']}-{sides['max']} px (median {sides['median']}, "
                      f"{sides['sampled']} sampled); {data['duplicates']['hashed']} files hashed, "
                      f"{data['duplicates']['pairs']} duplicate(s) across splits", soft_wrap=True)
    table = Table(title=f"graft auto: plan for a budget of {shown(budget_s)}")
    for col in ("stage", "what", "expected"):
        table.add_column(col, overflow="fold", justify="right" if col == "expected" else "left")
    for row in plan_rows(data, probe, plan, budget_s):
        table.add_row(*row)
    console.print(table)
