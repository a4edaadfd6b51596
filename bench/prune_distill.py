"""Channel pruning and knowledge distillation on a CIFAR-10 slice, with baselines from the same run.

Pruning: an EfficientNet-Lite0 run (frozen backbone, trained head) is channel-pruned by 30% and 50%
(torch-pruning, iterative, whole-network recovery fine-tune). Baselines measured here: the unpruned
run, and the unpruned network given the same recovery fine-tune (so the gain of fine-tuning the
backbone is not credited to pruning). Reports test accuracy, parameters, MACs, file size, and
latency at batch 1 and 64 (torch fp32 on this CPU, all models timed interleaved in one process).

Distillation: a teacher run (Lite0 at a larger input) teaches a student (another backbone and/or a
smaller input) with the student's backbone frozen; the same student without a teacher (alpha 0) has
the same budget. Repeated over seeds: mean ± std.

    python bench/prune_distill.py --data /work/shared/datasets/cifar10-jpeg.zip
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graftnet import config  # noqa: E402
from graftnet.compress.distill import DistillSettings, distill  # noqa: E402
from graftnet.compress.prune import PruneSettings, Run, count, finetune, prune_run  # noqa: E402
from graftnet.model import load_model  # noqa: E402
from graftnet.train.loop import State  # noqa: E402
from graftnet.train.pipeline import train  # noqa: E402


@torch.inference_mode()
def latencies(models: dict, size: int, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per batch; the models take turns so background load hits them alike."""
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.eval()
        m(x)  # warm-up
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_prune(a, out: Path) -> dict:
    base_over = {"data.path": a.data, "data.max_per_class": a.max_per_class, "backbone.name": "efficientnet_lite0",
                 "backbone.image_size": a.size, "out": str(out), "name": "base", "train.epochs": a.epochs}
    base = train(config.resolve(None, base_over))
    results = {"base": str(base)}
    pruned = {}
    for amount in a.amounts:
        pruned[amount] = prune_run(base, PruneSettings("structured", amount, steps=a.steps,
                                                       finetune_epochs=a.finetune_epochs, lr=a.lr,
                                                       batch_size=a.batch_size, round_to=8,
                                                       distill=a.recovery_distill),
                                   out=str(out), name=f"pruned{round(amount * 100)}")
    # the same recovery budget on the unpruned network: what fine-tuning alone gives
    run = Run(base)
    tuned = run.model
    finetune(run, tuned, a.steps * a.finetune_epochs, a.lr, a.batch_size, State(), [],
             torch.Generator().manual_seed(0))
    results["finetuned_unpruned_test_acc"] = run.accuracy(tuned)
    models = {"unpruned": load_model(base)[0], **{f"pruned{round(k * 100)}": load_model(v)[0] for k, v in pruned.items()}}
    rows = {}
    for name, path in [("unpruned", base)] + [(f"pruned{round(k * 100)}", v) for k, v in pruned.items()]:
        info = json.loads((path / "prune.json").read_text())["after"] if name != "unpruned" else None
        macs, params = count(models[name], a.size)
        acc = info["test_acc"] if info else json.loads((base / "test_metrics.json").read_text())["accuracy"]
        rows[name] = {"test_acc": acc, "params": params, "macs": macs,
                      "bytes": (path / "model.safetensors").stat().st_size}
    for batch, repeats in ((1, a.repeats * 4), (64, a.repeats)):
        for name, sec in latencies(models, a.size, batch, repeats).items():
            rows[name][f"latency_b{batch}_ms"] = sec * 1e3
    results["rows"] = rows
    return results


def bench_distill(a, out: Path) -> dict:
    common = {"data.path": a.data, "data.max_per_class": a.max_per_class, "out": str(out)}
    teacher = train(config.resolve(None, {**common, "backbone.name": a.teacher, "backbone.image_size": a.teacher_size,
                                          "name": "teacher", "train.epochs": a.epochs}))
    student = {**common, "backbone.name": a.student, "backbone.image_size": a.student_size, "train.epochs": a.epochs}
    runs = {"kd": [], "no_teacher": []}
    for seed in range(a.seeds):
        kd = distill(config.resolve(None, {**student, "train.seed": seed, "name": f"student-kd-s{seed}"}),
                     DistillSettings(str(teacher), a.temperature, a.alpha))
        base = distill(config.resolve(None, {**student, "train.seed": seed, "name": f"student-ce-s{seed}"}),
                       DistillSettings(None, a.temperature, 0.0))
        runs["kd"].append(json.loads((kd / "distill.json").read_text())["student_test_acc"])
        runs["no_teacher"].append(json.loads((base / "distill.json").read_text())["student_test_acc"])
        teacher_acc = json.loads((kd / "distill.json").read_text())["teacher_test_acc"]
    return {"teacher": str(teacher), "teacher_test_acc": teacher_acc, **runs,
            "kd_mean": statistics.mean(runs["kd"]), "kd_std": statistics.pstdev(runs["kd"]),
            "no_teacher_mean": statistics.mean(runs["no_teacher"]),
            "no_teacher_std": statistics.pstdev(runs["no_teacher"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/work/shared/datasets/cifar10-jpeg.zip")
    p.add_argument("--max-per-class", type=int, default=200)
    p.add_argument("--size", type=int, default=96, help="input size of the pruned runs")
    p.add_argument("--epochs", type=int, default=10, help="head epochs of the runs that are trained")
    p.add_argument("--amounts", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4, help="recovery fine-tune learning rate (Adam)")
    p.add_argument("--batch-size", type=int, default=32, help="recovery fine-tune batch size")
    p.add_argument("--recovery-distill", type=float, default=0.0, metavar="ALPHA",
                   help="recover with distillation from the unpruned model (prune --distill)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--teacher", default="efficientnet_lite0")
    p.add_argument("--teacher-size", type=int, default=128)
    p.add_argument("--student", default="mobilenetv2")
    p.add_argument("--student-size", type=int, default=96)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--only", choices=["prune", "distill"])
    p.add_argument("--out", default="/tmp/graftnet-bench-prune-distill")
    a = p.parse_args()
    out = Path(a.out)
    results = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(),
               "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.only != "distill":
        results["prune"] = bench_prune(a, out)
    if a.only != "prune":
        results["distill"] = bench_distill(a, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
