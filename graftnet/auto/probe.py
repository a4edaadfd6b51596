"""Which backbone and input size suit this data: each candidate's frozen features of a small
class-balanced sample, a logistic regression fitted on the sample's training part and scored on its
validation part, and the measured images per second that the plan extrapolates to the whole set.

A few seconds per candidate: the sample is decoded once (at the largest candidate size; each
candidate resizes as training does) and no feature is cached, so a dry run leaves nothing behind.
The chosen candidate's training speed (forward and backward with the top groups unfrozen, as auto fine-tunes) is timed
too: fine-tuning epochs are planned from it.
"""
from __future__ import annotations

import dataclasses
import random
import time

import torch

from ..backbones import get_spec
from ..config import RunConfig
from ..data.images import ImageSet, load_images, to_batch
from ..features import chunk_size, chunks, compute_features, device_of, pick_device
from ..model import build_model
from ..progress import log

SAMPLE_IMAGES = 256       # training images of the sample, spread over the classes
DEFAULT_CANDIDATES = ("efficientnet_lite0:224", "efficientnet_lite0:160", "mobilenetv2:224")
# a candidate a few points less accurate on the sample is kept when it is this much faster
NEAR = 0.02


def parse_candidates(text: str | None) -> list[tuple[str, int | None]]:
    """'name:px,name,...' -> [(name, px or None for the backbone's own size)]."""
    from ..errors import ConfigError
    out = []
    for item in (text.split(",") if text else DEFAULT_CANDIDATES):
        name, _, px = item.strip().partition(":")
        if not name or (px and not px.isdigit()):
            raise ConfigError(f"--backbones {text}: expected NAME or NAME:PX, comma-separated "
                              "(e.g. efficientnet_lite0:224,mobilenetv2:160)")
        out.append((name, int(px) if px else None))
    return out


def sample(splits: dict, per_class_train: int, seed: int) -> dict[str, list]:
    """At most `per_class_train` training images per class and half as many validation ones."""
    rng = random.Random(seed)
    out = {}
    for split, k in (("train", per_class_train), ("val", max(2, per_class_train // 2))):
        by_class: dict = {}
        for key, label in splits[split]:
            by_class.setdefault(label, []).append((key, label))
        out[split] = [s for label in sorted(by_class) for s in rng.sample(by_class[label], min(k, len(by_class[label])))]
    return out


def _linear_accuracy(train_x, train_y, val_x, val_y) -> float:
    from sklearn.linear_model import LogisticRegression
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(max_iter=300, C=0.5)
    clf.fit((train_x - mean) / std, train_y)
    return float((clf.predict((val_x - mean) / std) == val_y).mean())


def _train_rate(model, images: ImageSet, size: int, mean, std, cfg: RunConfig, batch: int = 64,
                steps: int = 4) -> float:
    """Images per second of forward and backward passes with the backbone's top groups unfrozen, as
    auto's fine-tuning runs them (stages.top_groups): its batch (`graft auto` fine-tunes at 64) in the
    micro-batches the training loop splits it into on this device (features.chunk_size),
    channels-last when the config says so, and BatchNorm as finetune.bn asks; one warm-up step, then
    `steps` timed one by one, the median taken (the rate of two steps together varied by about 15%
    between probes here, enough to move a 30-minute plan between 128 and 144 px). Timed on whole
    batches of 64, an epoch at 160 px was estimated 1.75x too long here (34 images/s against 60 in
    chunks of 16), which kept a 30-minute plan on CIFAR-10 from fine-tuning at all."""
    import statistics
    from ..train.finetune import FineTuneMode, all_groups, set_trainable
    from .stages import top_groups
    channels_last = cfg.backbone.channels_last
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    groups = all_groups(model)
    set_trainable(model, groups, top_groups(len(groups) - 1))   # the groups auto's fine-tuning trains
    FineTuneMode(model, cfg.finetune.bn).train()
    dev = device_of(model)
    n = min(batch, len(images))
    x = to_batch(images.images[:n], size, mean, std, channels_last).to(dev)
    y = images.labels[:n].to(dev)
    chunk = chunk_size(dev.type, size, cfg.train.micro_batch)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        opt.zero_grad()
        for xs, ys in zip(chunks(x, chunk), chunks(y, chunk)):
            (torch.nn.functional.cross_entropy(model(xs), ys) * len(xs) / len(x)).backward()
        opt.step()
        _sync(dev)   # a GPU runs the steps asynchronously: the clock waits for them
        times.append(time.perf_counter() - began)
    return len(x) / max(statistics.median(times[1:]), 1e-6)   # times[0]: the warm-up step


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(cfg: RunConfig, source, splits: dict, candidates: list[tuple[str, int | None]],
          feature_share_s: float | None = None) -> dict:
    """Every candidate's sample accuracy and speed, and the chosen one: the most accurate, or a
    faster one within NEAR of it; `feature_share_s`: candidates whose whole backbone pass would take
    longer are not chosen while another fits."""
    began = time.perf_counter()
    n_classes = len(source.classes)
    picked = sample(splits, max(2, SAMPLE_IMAGES // n_classes), cfg.train.seed)
    sizes = [px or get_spec(name).input_size for name, px in candidates]
    t0 = time.perf_counter()
    decoded = {k: load_images(source, v, max(sizes), skip_bad=True, workers=cfg.data.workers,
                              gray=cfg.data.grayscale) for k, v in picked.items()}
    decode_rate = sum(len(v) for v in decoded.values()) / max(time.perf_counter() - t0, 1e-6)
    every = sum(len(v) for v in splits.values())
    device = pick_device(cfg.train.device)
    rows = []
    for (name, px), size in zip(candidates, sizes):
        c_cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, name=name, image_size=size))
        t0 = time.perf_counter()
        model, spec = build_model(c_cfg, source.classes)
        model = model.to(device)
        build_s = time.perf_counter() - t0
        # the first batch pays for allocation and thread start-up, which the whole pass does not repeat
        compute_features(model, decoded["val"].subset(range(min(8, len(decoded["val"])))), size, spec.mean,
                         spec.std, batch_size=8, precision=cfg.backbone.precision, description="warm-up")
        feats, seconds = {}, 0.0
        for split, images in decoded.items():
            t0 = time.perf_counter()
            feats[split] = compute_features(model, images, size, spec.mean, spec.std, batch_size=64,
                                            precision=cfg.backbone.precision, description=f"probe {name} {size}px")
            seconds += time.perf_counter() - t0
        rate = sum(len(v) for v in decoded.values()) / max(seconds, 1e-6)
        acc = _linear_accuracy(feats["train"].float().numpy(), decoded["train"].labels.numpy(),
                               feats["val"].float().numpy(), decoded["val"].labels.numpy())
        row = {"backbone": name, "image_size": size, "sample_acc": round(acc, 4), "images_per_s": round(rate, 2),
               "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3), "native_size": get_spec(name).input_size,
               "features_s": round(every / rate, 1), "build_s": round(build_s, 2), "model": model, "spec": spec}
        rows.append(row)
        log(f"probe: {name} at {size}px: sample accuracy {acc:.3f} ({len(decoded['val'])} validation images), "
            f"{rate:.0f} images/s, the whole set's backbone pass about {row['features_s']:.0f}s")
    # where none fits, the set is sliced to fit (plan.slice_to_fit) whichever is chosen: choose among all
    fits = [r for r in rows if feature_share_s is None or r["features_s"] <= feature_share_s] or rows
    top = max(r["sample_acc"] for r in fits)
    chosen = max((r for r in fits if r["sample_acc"] >= top - NEAR), key=lambda r: (r["images_per_s"], r["sample_acc"]))
    slow = sum(feature_share_s is not None and r["features_s"] > feature_share_s for r in rows)
    why = (f"the fastest within {NEAR:g} of the best sample accuracy ({top:.3f})"
           + ("" if not slow else f"; {slow} candidate(s) too slow for the budget" if len(fits) < len(rows)
              else "; none passes the whole set within its share of the budget"))
    from .stages import FINETUNE_BATCH
    train_rate = _train_rate(chosen["model"], decoded["train"], chosen["image_size"], chosen["spec"].mean,
                             chosen["spec"].std, cfg, FINETUNE_BATCH)
    for r in rows:
        del r["model"], r["spec"]
    return {"candidates": rows, "chosen": chosen, "why": why, "images_per_s": chosen["images_per_s"],
            "train_images_per_s": round(train_rate, 2), "decode_images_per_s": round(decode_rate, 2),
            "sample": {k: len(v) for k, v in decoded.items()}, "seconds": round(time.perf_counter() - began, 2)}

