"""Does a pruned model's channel count decide its speed? One run pruned alike, channel counts rounded
to multiples of 1 (any count), 8 and 16 and by the default (`auto_round_to`), each timed in turns
with the unpruned model.

    python bench/prune_round.py --base RUN [--amount 0.389] [--channels inner] [--rounds 1,8,16,auto]
                                [--work DIR] [--out bench/results/prune_round.json]

RUN is a finished run (e.g. the fine-tuned model of `bench/auto.py --stages latency300`: Lite0 at
160 px, top groups fine-tuned on 300 images per class). Each variant is `graft prune --method
structured --amount A --channels C --finetune-epochs 0 [--round-to N]` (BatchNorm recalibrated, no
recovery epoch: this measures speed, and accuracy after recovery is the pruning section's question),
exported to fp32 and int8 ONNX as `graft auto` exports them. Latency: ONNX Runtime, every model timed
in turns (`search.measure.retime`), at batch 1 (7 rounds of 20 runs) and batch 64 (3 rounds of 5),
the median of the rounds' medians. Speed-ups are the unpruned model's time over the pruned one's,
same precision.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRAFTNET_QUIET", "1")
from equivalence import atomic_write_json, git_state, loadavg, machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--amount", type=float, default=0.389, help="the share graft auto's prune stage chose for "
                   "a 1.25 ms bound in latency300")
    p.add_argument("--channels", default="inner")
    p.add_argument("--rounds", default="1,8,16,auto")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / ".work" / "prune_round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prune_round.json")
    a = p.parse_args()
    from graftnet.auto.stages import measure
    from graftnet.compress.prune import PruneSettings, prune_run
    from graftnet.search.measure import retime
    t0 = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    runs = {"unpruned": a.base}
    variants = {}
    for r in [v for v in a.rounds.split(",") if v]:
        name = f"round-{r}"
        run = a.work / name
        if not (run / "prune.json").is_file():   # a finished variant is reused on the next start
            settings = PruneSettings(amount=a.amount, finetune_epochs=0, channels=a.channels, seed=0,
                                     round_to=None if r == "auto" else int(r))
            run = prune_run(a.base, settings, out=str(a.work), name=name, test=False)
        record = json.loads((run / "prune.json").read_text())
        variants[name] = {"macs_ratio": record["after"]["macs"] / record["before"]["macs"],
                          "val_acc": record["after"]["val_acc"], "val_acc_before": record["before"]["val_acc"]}
        runs[name] = run
    files = {}
    for name, run in runs.items():
        for kind, m in measure(run, variants.get(name, {}).get("val_acc")).items():   # exports as graft auto does
            if "error" not in m:
                files[f"{name}/{kind}"] = m["model"]
    b1, b64 = retime(files, 1, rounds=7), retime(files, 64, rounds=3, repeats=5)
    rows = {}
    for key in files:
        name, kind = key.split("/")
        base = f"unpruned/{kind}"
        rows[key] = {"b1_ms": b1[key], "b64_ms": b64[key], "speedup_b1": round(b1[base] / b1[key], 3),
                     "speedup_b64": round(b64[base] / b64[key], 3), **variants.get(name, {})}
        print(f"{key:22s} batch 1 {b1[key]:7.3f} ms ({rows[key]['speedup_b1']:.2f}x)   "
              f"batch 64 {b64[key]:8.2f} ms ({rows[key]['speedup_b64']:.2f}x)", flush=True)
    atomic_write_json(a.out, {"command": "python bench/prune_round.py " + " ".join(sys.argv[1:]),
                              "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                              "git": git_state(ROOT), "loadavg": loadavg(), "base": str(a.base),
                              "amount": a.amount, "channels": a.channels, "rows": rows,
                              "wall_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
