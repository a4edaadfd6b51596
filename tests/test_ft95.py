"""bench/ft95.py: the chain behind the best CIFAR-10 result runs end to end (on a few generated
images, real Lite0/Lite1 weights), each stage starting from the last, and a second call goes on
where the first stopped instead of training again."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from .conftest import ROOT, make_folder

SCRIPT = ROOT / "bench" / "ft95.py"


def ft95(tmp_path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), "--smoke", "6", "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *extra]
    env = {**os.environ, "GRAFTNET_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout


def test_chain_runs_and_continues_where_it_stopped(tmp_path):
    make_folder(tmp_path / "data", splits={"train": 8, "test": 4})
    ft95(tmp_path)
    out = tmp_path / "out"
    sys.path.insert(0, str(SCRIPT.parent))
    from ft95 import CHAIN
    for step in CHAIN:  # each stage at its (smoke) size, from the step it names, one epoch a stage
        cfg = yaml.safe_load((out / step.name / "config.yaml").read_text())
        assert cfg["backbone"]["name"] == step.backbone and cfg["backbone"]["image_size"] == step.size // 4
        assert cfg["train"]["init"] == (str(out / step.init) if step.init else None)
        assert cfg["train"]["epochs"] == (0 if step.init else 1) and cfg["finetune"]["epochs"] == 1
        assert cfg["finetune"]["unfreeze"] == step.unfreeze and cfg["finetune"]["lr"] == step.lr
    members = [s.name for s in CHAIN if s.member]
    ens = json.loads((out / "ensemble-tta" / "ensemble.json").read_text())
    assert ens["tta"] is True and [m["absolute"] for m in ens["members"]] == [str(out / m) for m in members]
    chain = json.loads((out / "chain.json").read_text())
    assert [r["run"] for r in chain["steps"]] == [s.name for s in CHAIN]
    assert all(f"--name {r['run']} " in r["command"] for r in chain["steps"])
    assert all(r["test"] is not None and (r["test_tta"] is not None) == r["member"] for r in chain["steps"])
    assert chain["ensemble_tta"] == json.loads((out / "ensemble-tta" / "test_metrics.json").read_text())["accuracy"]

    # everything done: a second call trains and scores nothing
    again = ft95(tmp_path)
    assert "$ graft" not in again and again.count("skipped") == len(CHAIN)
    # a killed last stage (no test score yet) and a missing ensemble: only those are redone
    (out / CHAIN[-1].name / "test_metrics.json").unlink()
    (out / "ensemble-tta" / "test_metrics.json").unlink()
    commands = [line for line in ft95(tmp_path, "--dry-run").splitlines() if line.startswith("$ graft")]
    assert len(commands) == 2
    assert commands[0].startswith(f"$ graft finetune --resume {out / CHAIN[-1].name}")
    assert commands[1].startswith("$ graft ensemble") and "--tta" in commands[1]
    assert sorted(p.name for p in out.iterdir()) == sorted([s.name for s in CHAIN] + ["ensemble-tta",
                                                                                      "chain.json"])
