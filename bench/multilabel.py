"""Multi-label CIFAR-10 mosaics: mAP and per-label F1 of a head on the frozen, embedded Lite0, and
of the same run fine-tuned.

    python bench/multilabel.py [--mosaics 3000] [--epochs 10] [--image-size 128] [--finetune-epochs 4]

Each mosaic is a 2x2 grid of four CIFAR-10 images (64x64 px), labelled with the classes it shows
(one to four distinct labels), listed in a labels.csv beside them: `graft train --data DIR --labels
labels.csv` on it trains a sigmoid per class. The set is built once under --work and reused (a
mosaic already written is not made again; labels.csv is written last, by rename, so a set with a
labels.csv is whole); a run already finished is read back, one that was killed goes on with
--resume. Writes bench/results/multilabel.json (temp file + rename): the command, machine, date and
commit, the set's size and label frequencies, and per run (frozen; fine-tuned: the top groups of
the backbone trained --finetune-epochs more, 0 skips it) the test mAP, macro/micro F1 and each
label's AP, ROC-AUC, F1 and threshold (chosen on the validation split).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRAFTNET_QUIET", "1")

from bench.record import commit, machine  # noqa: E402
from graftnet.config import resolve  # noqa: E402
from graftnet.data.sources import find_cifar10  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402

TILE = 32  # CIFAR-10's own size: a mosaic is 2x2 tiles, 64x64 px


def cifar_members(path: Path) -> list[tuple[str, str]]:
    """(member, class) for every image of the JPEG copy, train and test alike: the mosaics' own
    seeded split decides what is tested."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg", ".png"))]
    return sorted((n, n.split("/")[-2]) for n in names)


def build(data: Path, cifar: Path, n: int, seed: int = 0) -> dict[str, int]:
    """data/img/<i>.jpg and data/labels.csv; returns label -> mosaics showing it."""
    labels_csv = data / "labels.csv"
    if labels_csv.is_file() and len(labels_csv.read_text().splitlines()) == n + 1:
        rows = [line.split(",")[1].split("|") for line in labels_csv.read_text().splitlines()[1:]]
        return {c: sum(c in r for r in rows) for c in sorted({c for r in rows for c in r})}
    members = cifar_members(cifar)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(members), (n, 4))  # drawn up front: resuming redraws the same set
    (data / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    with zipfile.ZipFile(cifar) as zf:
        for i, four in enumerate(picks):
            path = data / "img" / f"{i:05d}.jpg"
            chosen = [members[j] for j in four]
            if not path.is_file():
                mosaic = Image.new("RGB", (2 * TILE, 2 * TILE))
                for k, (member, _) in enumerate(chosen):
                    tile = Image.open(io.BytesIO(zf.read(member))).convert("RGB").resize((TILE, TILE))
                    mosaic.paste(tile, ((k % 2) * TILE, (k // 2) * TILE))
                tmp = path.with_suffix(".part")
                mosaic.save(tmp, "JPEG", quality=95)
                os.replace(tmp, path)
            rows.append(f"img/{path.name}," + "|".join(sorted({c for _, c in chosen})))
    tmp = labels_csv.with_suffix(".part")
    tmp.write_text("file,labels\n" + "\n".join(rows) + "\n")
    os.replace(tmp, labels_csv)
    return build(data, cifar, n, seed)


def run(data: Path, work: Path, args, finetune_epochs: int = 0) -> Path:
    name = f"mosaics{args.mosaics}-e{args.epochs}-{args.image_size}px" + (f"-ft{finetune_epochs}" if finetune_epochs else "")
    run_dir = work / "runs" / name
    if (run_dir / "test_metrics.json").is_file():
        return run_dir
    if (run_dir / "config.yaml").is_file():
        return train(None, resume=run_dir).run_dir
    cfg = resolve(None, {"data.path": str(data), "data.labels": "labels.csv", "name": name,
                         "out": str(work / "runs"), "train.epochs": args.epochs,
                         "backbone.image_size": args.image_size, "train.early_stopping": 3,
                         **({"finetune.epochs": finetune_epochs} if finetune_epochs else {})})
    return train(cfg).run_dir


def scores(run_dir: Path, seconds: float) -> dict:
    m = json.loads((run_dir / "test_metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "run": str(run_dir), "split_sizes": m["split_sizes"], "epochs_run": len(history),
        "fine_tuning_epochs": sum(r.get("stage") == "fine-tuning" for r in history),
        "test": {"map": m["map"], "macro_f1": m["macro"]["f1"], "micro_f1": m["micro"]["f1"],
                 "macro_auc": m["macro"]["auc"], "exact_match": m["exact_match"]},
        "per_label": {r["class"]: {k: r[k] for k in ("ap", "auc", "f1", "precision", "recall", "threshold",
                                                       "support")} for r in m["per_label"]},
        "seconds": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mosaics", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--finetune-epochs", type=int, default=4, help="0: the frozen run only")
    p.add_argument("--cifar", type=Path, help="the CIFAR-10 JPEG ZIP (default: the shared copy)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "graftnet" / "bench" / "multilabel")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "multilabel.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    data = args.work / f"mosaics{args.mosaics}"
    cifar = args.cifar or find_cifar10(download=False)
    if not zipfile.is_zipfile(cifar):
        sys.exit(f"{cifar}: the mosaics are made from the CIFAR-10 JPEG ZIP copy; pass it with --cifar")
    frequency = build(data, cifar, args.mosaics)
    built = time.perf_counter() - t0
    result = {
        "command": "python " + shlex.join(["bench/multilabel.py", *sys.argv[1:]]),
        "machine": machine(), "commit": commit(),
        "backbone": "efficientnet_lite0 (embedded ImageNet weights)", "image_size": args.image_size,
        "mosaics": args.mosaics, "label_frequency": frequency, "seconds_build_set": round(built, 1), "runs": {}}
    for kind, epochs in (("frozen", 0), ("fine-tuned", args.finetune_epochs)):
        if kind == "fine-tuned" and not epochs:
            continue
        t = time.perf_counter()
        result["runs"][kind] = scores(run(data, args.work, args, epochs), time.perf_counter() - t)
        result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
        print(kind, json.dumps(result["runs"][kind]["test"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".part")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
