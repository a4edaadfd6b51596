"""Does timing models in turns bias a model's latency? One model timed alone, and in turns with
another right before it, with and without `export.runtime.TURN_PAUSE_S` between them.

    python bench/turns.py --run RUN [--repeats 6] [--out bench/results/turns.json]

RUN is a finished run (e.g. `bench/auto.py --stages latency300`'s fine-tuned model: Lite0 at 160 px);
its fp32 and int8 ONNX models are exported as `graft auto` exports them. Each condition is one call
of `export.runtime.timed_in_turns` (5 rounds of 20 runs at batch 1, the median of the rounds'
medians); the three conditions are interleaved `--repeats` times, so the machine's slow and fast
moments fall on all of them, and each is summarised by the median over repeats. The ratio is a
condition's time over the model's time alone. Then (--drift-s) the int8 model alone, sampled
every DRIFT_STEP_S: how often and for how long the machine has slow moments.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("GRAFTNET_QUIET", "1")
from equivalence import atomic_write_json, git_state, loadavg, machine  # noqa: E402


DRIFT_STEP_S = 0.25   # between samples of the drift measurement
SLOW = 1.2            # a sample this many times the median is a slow moment


def slow_moments(model: str, seconds: float) -> dict:
    """One model's median of 20 batch-1 runs sampled every DRIFT_STEP_S for `seconds`: the share of
    samples over SLOW times the median and the length of each slow spell (consecutive slow samples)."""
    from graftnet.export.runtime import session, timed_runs
    sess, samples, end = session(model), [], time.monotonic() + seconds
    timed_runs(sess, 1, 3)
    while time.monotonic() < end:
        samples.append(round(statistics.median(timed_runs(sess, 1, 20, warmup=1)), 4))
        time.sleep(DRIFT_STEP_S)
    median = statistics.median(samples)
    spells, run = [], 0
    for t in samples + [0.0]:
        if t > SLOW * median:
            run += 1
        elif run:
            spells.append(round(run * (DRIFT_STEP_S + 20 * median / 1000), 2))
            run = 0
    return {"median_ms": median, "slow_share": round(sum(t > SLOW * median for t in samples) / len(samples), 4),
            "slow_spells_s": spells, "samples_ms": samples}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--drift-s", type=float, default=120.0, help="seconds of the int8 model timed alone, "
                   "every DRIFT_STEP_S: how long the machine's slow moments last (0: not measured)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "turns.json")
    a = p.parse_args()
    from graftnet.auto.stages import measure
    from graftnet.export.runtime import TURN_PAUSE_S, timed_in_turns
    t0, start_load = time.perf_counter(), loadavg()
    models = {k: m["model"] for k, m in measure(a.run).items() if "error" not in m}
    rows = {}
    for timed, other in (("int8", "fp32"), ("fp32", "int8")):
        if timed not in models or other not in models:
            continue
        # the other model first in each round: the timed one always follows it
        pair = {other: models[other], timed: models[timed]}
        conditions = {"alone": lambda: timed_in_turns({timed: models[timed]})[timed],
                      "after_other_no_pause": lambda: timed_in_turns(pair, pause=0.0)[timed],
                      "after_other_paused": lambda: timed_in_turns(pair, pause=TURN_PAUSE_S)[timed]}
        times: dict = {c: [] for c in conditions}
        for _ in range(a.repeats):
            for c, fn in conditions.items():
                times[c].append(round(statistics.median(fn()), 4))
        alone = statistics.median(times["alone"])
        rows[timed] = {c: {"median_ms": round(statistics.median(v), 4), "ratio_to_alone":
                           round(statistics.median(v) / alone, 3), "repeats_ms": v} for c, v in times.items()}
        print(f"{timed} after {other}: " + "   ".join(f"{c} {r['median_ms']:.3f} ms ({r['ratio_to_alone']:.2f}x)"
                                                   for c, r in rows[timed].items()), flush=True)
    drift = None
    if a.drift_s > 0 and "int8" in models:
        drift = slow_moments(models["int8"], a.drift_s)
        print(f"int8 alone every {DRIFT_STEP_S} s for {a.drift_s:g} s: median {drift['median_ms']:.3f} ms, "
              f"{drift['slow_share']:.1%} of samples over {SLOW:g}x it, slow spells {drift['slow_spells_s']} s", flush=True)
    atomic_write_json(a.out, {"command": "python bench/turns.py " + " ".join(sys.argv[1:]),
                              "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                              "git": git_state(ROOT), "loadavg_start": start_load, "loadavg_end": loadavg(),
                              "run": str(a.run), "pause_s": TURN_PAUSE_S, "rows": rows, "drift": drift,
                              "wall_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
